"""GPU sizing for the vLLM backend: the default ``max_num_batched_tokens``, and run plans.

vLLM sizes its KV cache so that the engine fills ``gpu_memory_utilization`` of the GPU, but its
memory profile does not count the prompt-logprob tensors (vllm-project/vllm#5907). What those
tensors cost depends on the model runner vLLM uses (:data:`RUNNERS`):

- **V1** (``vllm/v1/worker/gpu_model_runner.py::_get_prompt_logprobs_dict``): per request, the
  full-vocabulary logits of all its scheduled prompt tokens (model dtype) and their fp32
  log-softmax (``sampler.compute_logprobs``), so the tokens of one engine step are bounded by

      tokens <= (total x (1 - gpu_memory_utilization) - margin) / (vocab x (logit bytes + 4))

- **V2**, vLLM 0.32's default on CUDA (``VllmConfig.use_v2_model_runner``;
  ``vllm/v1/worker/gpu/sample/prompt_logprob.py``): logits of at most ``CHUNK_SIZE`` = 1,024
  prompt tokens at a time, and a Triton kernel that gathers the actual token's logprob without
  building the log-softmax. The peak, 1,024 x vocab x logit bytes, does not grow with the step,
  so the step keeps vLLM's own default (16,384 on >= 70 GiB GPUs, else 8,192).

:func:`step_token_budget` computes the bound for either runner; :func:`plan_run` sizes a whole
scoring run (docs/scaling.md, "Worked plans"; ``benchmarks/gpu_plan.py`` prints them).

The bound is per GPU whatever the tensor-parallel size: vLLM's logits processor all-gathers the
vocabulary shards (``Platform.use_all_gather()`` is true on CUDA), so every rank holds the full
logits. For V1 it assumes every token of the step at once; V1 computes prompt logprobs request
by request, so its real peak is about two requests' worth (the previous request's log-softmax is
still alive while the next is computed), which the bound covers with room for fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20
# Allocations vLLM makes after its profile that land outside gpu_memory_utilization (cuBLAS and
# NCCL workspaces created lazily, the caching allocator's rounding of variable-sized logits).
SAFETY_MARGIN_BYTES = 1 * GiB
# log_softmax(logits, dtype=float32): the scores vLLM ranks and gathers the actual token from.
LOG_SOFTMAX_BYTES = 4
LOGIT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# vLLM refuses max_num_batched_tokens below max_num_seqs (its default: 1024 on H100/H200-class
# GPUs, 256 on others), so a smaller default would not even start the engine.
MIN_BATCHED_TOKENS = 1024
# vLLM's own offline default on >= 70 GiB GPUs: a step of 16k tokens keeps an H100 busy for
# ~0.08 s even for a 1B model, so a larger step buys no prefill speed, only activation memory.
MAX_BATCHED_TOKENS = 16384
ROUND_TO = 256  # whole multiples: readable numbers and aligned shapes
# vLLM's model runners (VllmConfig.use_v2_model_runner picks one).
RUNNERS = ("v1", "v2")
# Model Runner V2 computes prompt logprobs this many tokens at a time
# (vllm/v1/worker/gpu/sample/prompt_logprob.py: CHUNK_SIZE).
V2_PROMPT_LOGPROB_CHUNK = 1024
# vLLM's offline (LLM class) default max_num_batched_tokens: 16,384 on GPUs of >= 70 GiB, else
# 8,192 (vllm/engine/arg_utils.py; it also gives A100s 8,192, which it knows by name).
VLLM_DEFAULT_BIG_GPU_BYTES = 70 * (1 << 30)

# Measured on this project's CPUs (docs/benchmarks.md): what one render process feeds
# (benchmarks/pipeline_ceiling.py, in process, --backend null) and the output's Parquet size.
RENDER_TOKENS_PER_S = 314_731
PARQUET_BYTES_PER_TOKEN = 4.42


def logit_entry_bytes(dtype: str, runner: str = "v1") -> int:
    """Bytes per (token, vocabulary entry) of the prompt-logprob tensors: logits, plus the fp32
    log-softmax on the V1 runner (V2 never builds it).

    >>> logit_entry_bytes("bfloat16"), logit_entry_bytes("float32"), logit_entry_bytes(
    ...     "bfloat16", "v2")
    (6, 8, 2)
    """
    check_runner(runner)
    return LOGIT_BYTES[dtype] + (LOG_SOFTMAX_BYTES if runner == "v1" else 0)


def check_runner(runner: str) -> None:
    if runner not in RUNNERS:
        raise ValueError(f"model runner {runner!r}: choose {', '.join(RUNNERS)}")


def vllm_default_batched_tokens(gpu_memory_bytes: int) -> int:
    """vLLM's own offline default step for a GPU of this size (LLM class)."""
    return 16384 if gpu_memory_bytes >= VLLM_DEFAULT_BIG_GPU_BYTES else 8192


@dataclass(frozen=True)
class StepBudget:
    """The default ``max_num_batched_tokens`` and the arithmetic behind it."""

    tokens: int  # the step: V1 clamped and rounded; V2 vLLM's own default
    fits: int  # tokens whose logits fit the headroom before clamping (may be <= 0)
    headroom_bytes: int  # total x (1 - gpu_memory_utilization) - margin
    bytes_per_token: int  # vocab x logit_entry_bytes(dtype, runner)
    runner: str = "v1"

    @property
    def peak_tokens(self) -> int:
        """Tokens whose prompt-logprob tensors are alive at once: the step (V1), a chunk (V2)."""
        return self.tokens if self.runner == "v1" else min(self.tokens, V2_PROMPT_LOGPROB_CHUNK)

    @property
    def peak_bytes(self) -> int:
        """The prompt-logprob peak outside vLLM's profile at ``tokens`` tokens in one step."""
        return self.peak_tokens * self.bytes_per_token

    @property
    def reason(self) -> str:
        free = (f"{self.headroom_bytes / GiB:.2f} GiB free outside gpu_memory_utilization (after "
                f"a {SAFETY_MARGIN_BYTES / GiB:g} GiB margin)")
        if self.runner == "v2":
            why = (f"model runner V2 computes prompt logprobs {V2_PROMPT_LOGPROB_CHUNK:,} tokens "
                   f"at a time without a full log-softmax: {self.peak_bytes / GiB:.2f} GiB of "
                   f"logits at most, whatever the step; {free}")
            if self.peak_bytes > self.headroom_bytes:
                return (f"{why}; that chunk does not fit: lower --gpu-memory-utilization; step "
                        f"{self.tokens:,} (vLLM's default)")
            return f"{why}; step {self.tokens:,} (vLLM's own default for this GPU)"
        why = (f"model runner V1: {free} / {self.bytes_per_token:,} B of prompt-logprob tensors "
               f"per token = {max(self.fits, 0):,} tokens")
        if self.fits < MIN_BATCHED_TOKENS:
            return (f"{why}; raised to vLLM's minimum {MIN_BATCHED_TOKENS}: the logits peak "
                    f"({self.peak_bytes / GiB:.2f} GiB) exceeds the headroom, lower "
                    "--gpu-memory-utilization or pass --max-num-batched-tokens")
        if self.fits > MAX_BATCHED_TOKENS:
            return f"{why}; capped at {MAX_BATCHED_TOKENS} (vLLM's own offline default)"
        return f"{why}; rounded down to a multiple of {ROUND_TO}"


def step_token_budget(
    gpu_memory_bytes: int,
    vocab_size: int,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "bfloat16",
    runner: str = "v1",
) -> StepBudget:
    """The largest step (in tokens) whose prompt-logprob tensors fit outside vLLM's budget.

    ``runner="v2"``: the tensors are one 1,024-token chunk's logits whatever the step, so the
    step is vLLM's own default (the chunk's fit is reported in ``reason``):

    >>> b = step_token_budget(81559 * MiB, 128256, 0.9, runner="v2")
    >>> b.tokens, round(b.peak_bytes / GiB, 2)
    (16384, 0.24)

    V1 (below) bounds the step itself.

    ``gpu_memory_bytes`` is one GPU's total (per TP rank: every rank holds the full logits).
    The result is rounded down to a multiple of 256 and clamped to [1024, 16384]; it may be
    below ``max_model_len``, which vLLM accepts with chunked prefill (its default for decoder
    LMs: a long row is split over several steps).

    An H100 80GB (81,559 MiB as NVML reports it) at the default 0.9, Llama-3's 128k vocabulary
    in bf16, and an H200 (143,771 MiB), where the bound exceeds the cap:

    >>> step_token_budget(81559 * MiB, 128256, 0.9).tokens
    9472
    >>> step_token_budget(143771 * MiB, 128256, 0.9).tokens
    16384
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    headroom = int(gpu_memory_bytes * (1 - gpu_memory_utilization)) - SAFETY_MARGIN_BYTES
    per_token = vocab_size * logit_entry_bytes(dtype, runner)
    fits = headroom // per_token
    if runner == "v2":
        return StepBudget(vllm_default_batched_tokens(gpu_memory_bytes), fits, headroom,
                          per_token, runner)
    tokens = min(max(fits // ROUND_TO * ROUND_TO, MIN_BATCHED_TOKENS), MAX_BATCHED_TOKENS)
    return StepBudget(tokens, fits, headroom, per_token, runner)


# --------------------------------------------------------------------------- run plans


@dataclass(frozen=True)
class ModelSpec:
    """What sizing needs of a reference model (bf16 weights)."""

    name: str
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    def kv_bytes_per_token(self, tensor_parallel_size: int = 1) -> float:
        """K and V of every layer for one token, bf16, on one rank (TP splits the KV heads)."""
        heads = max(self.kv_heads / tensor_parallel_size, 1)  # a head is replicated, not split
        return 2 * self.layers * heads * self.head_dim * 2


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # total, as NVML (and so vLLM) reports it


@dataclass(frozen=True)
class Plan:
    """One scoring run on ``gpus`` GPUs: actors, memory per GPU, time, feed and output."""

    model: str
    gpu: str
    runner: str
    gpus: int
    tensor_parallel_size: int
    num_workers: int
    max_num_batched_tokens: int
    gpu_budget_bytes: float  # total x gpu_memory_utilization: what vLLM may take
    weights_bytes: float  # per GPU
    kv_step_bytes: float  # per GPU: KV of one step's tokens (vLLM fills the rest with cache)
    logits_peak_bytes: float  # per GPU, outside the budget
    headroom_bytes: float  # per GPU, outside the budget, after the margin
    spare_bytes: float  # per GPU: budget - weights - one step's KV (activations, more KV)
    fits: bool  # spare > 0 and the logits peak inside the headroom
    tokens: float
    tokens_per_s: float  # the cluster's
    hours: float
    render_actors: int
    render_load: float  # of the render actors' capacity, at the cluster's rate
    output_bytes: float


def plan_run(
    model: ModelSpec,
    gpu: GpuSpec,
    *,
    gpus: int,
    tensor_parallel_size: int,
    rows: int,
    tokens_per_row: int,
    gpu_tokens_per_s: float,
    gpu_memory_utilization: float = 0.9,
    render_tokens_per_s: float = RENDER_TOKENS_PER_S,
    bytes_per_token: float = PARQUET_BYTES_PER_TOKEN,
    runner: str = "v1",
) -> Plan:
    """Size a run: ``gpus / tensor_parallel_size`` engines, the default step budget, hours.

    ``gpu_tokens_per_s`` is one GPU's prefill rate (``benchmarks/pipeline_ceiling.py``'s
    ``gpu_demand``); a TP engine of t GPUs scores t times one GPU's rate (communication losses
    are inside the assumed MFU).
    """
    if gpus % tensor_parallel_size:
        raise ValueError(f"{gpus} GPUs do not split into engines of {tensor_parallel_size}")
    budget = step_token_budget(gpu.memory_bytes, model.vocab, gpu_memory_utilization,
                               runner=runner)
    weights = model.params * 2 / tensor_parallel_size
    kv_step = budget.tokens * model.kv_bytes_per_token(tensor_parallel_size)
    gpu_budget = gpu.memory_bytes * gpu_memory_utilization
    tokens = float(rows) * tokens_per_row
    rate = gpus * gpu_tokens_per_s
    actors = math.ceil(rate / render_tokens_per_s)
    return Plan(
        model=model.name, gpu=gpu.name, runner=runner, gpus=gpus,
        tensor_parallel_size=tensor_parallel_size,
        num_workers=gpus // tensor_parallel_size, max_num_batched_tokens=budget.tokens,
        gpu_budget_bytes=gpu_budget, weights_bytes=weights, kv_step_bytes=kv_step,
        logits_peak_bytes=budget.peak_bytes, headroom_bytes=budget.headroom_bytes,
        spare_bytes=gpu_budget - weights - kv_step,
        fits=weights + kv_step < gpu_budget and budget.peak_bytes <= budget.headroom_bytes,
        tokens=tokens, tokens_per_s=rate, hours=tokens / rate / 3600,
        render_actors=actors, render_load=rate / (actors * render_tokens_per_s),
        output_bytes=tokens * bytes_per_token,
    )
