"""Size whole scoring runs on GPUs (:func:`plan_run`) and print docs/scaling.md's GPU sizing
table and worked plans.

    python benchmarks/gpu_plan.py            # both tables, as markdown

Nothing is measured here: the default ``max_num_batched_tokens`` is
:func:`profit_prep.scorers.sizing.step_token_budget` for each of vLLM's model runners (V2, vLLM
0.32's default on CUDA, and V1, under ``VLLM_USE_V2_MODEL_RUNNER=0`` or without Triton), the per-GPU
prefill rate is ``pipeline_ceiling.gpu_demand`` (MFU x an H100's dense bf16 peak / (2 x
params); the H200 has the same compute), the render rate and Parquet bytes per token are the
figures measured in docs/benchmarks.md. ``tests/test_sizing.py`` checks that the doc holds
exactly these lines.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_ceiling import MODELS, gpu_demand  # noqa: E402

from profit_prep.scorers.sizing import MiB, step_token_budget  # noqa: E402

# Measured on this project's CPUs (docs/benchmarks.md): what one render process feeds
# (benchmarks/pipeline_ceiling.py, in process, --backend null) and the output's Parquet size.
RENDER_TOKENS_PER_S = 314_731
PARQUET_BYTES_PER_TOKEN = 4.42


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


# --------------------------------------------------------------------------- the doc's tables


RUNNERS = ("v2", "v1")  # V2 first: what vLLM 0.32 uses on CUDA unless told otherwise

# Totals as nvidia-smi (NVML, which vLLM reads) reports them.
L4 = GpuSpec("L4 24GB", 23034 * MiB)
H100 = GpuSpec("H100 80GB", 81559 * MiB)
H200 = GpuSpec("H200 141GB", 143771 * MiB)

# Llama-3.1-8B and Llama-3.3-70B shapes; nominal parameter counts, as pipeline_ceiling's.
LLAMA_8B = ModelSpec("8B (Llama-3.1-8B)", MODELS["8B"], layers=32, kv_heads=8, head_dim=128,
                     vocab=128256)
LLAMA_70B = ModelSpec("70B (Llama-3.3-70B)", MODELS["70B"], layers=80, kv_heads=8,
                      head_dim=128, vocab=128256)

ROWS, TOKENS_PER_ROW, CLUSTER_GPUS = 1_000_000, 500, 8

# (reference model, vocab, dtype, GPU, GPUs per engine, gpu_memory_utilization)
SIZING_ROWS = [
    ("Qwen2.5-0.5B", 151936, "bfloat16", L4, 1, 0.6),
    ("Qwen2.5-7B", 152064, "bfloat16", L4, 2, 0.8),
    ("Qwen2.5-7B", 152064, "bfloat16", H100, 1, 0.8),
    ("Llama-3.3-70B", 128256, "bfloat16", H100, 4, 0.85),
    ("Llama-3.3-70B", 128256, "bfloat16", H200, 2, 0.85),
    ("SmolLM2-135M (gpu_check.py)", 49152, "float32", H200, 1, 0.9),
]

# (model, GPU, GPUs per engine) on CLUSTER_GPUS GPUs, at the default gpu_memory_utilization 0.9
PLANS = [
    (LLAMA_8B, H100, 1),
    (LLAMA_70B, H100, 4),
    (LLAMA_70B, H100, 8),
    (LLAMA_70B, H200, 4),
    (LLAMA_70B, H200, 8),
    (LLAMA_70B, H200, 2),
    (LLAMA_70B, H100, 2),
]


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def sizing_table() -> list[str]:
    lines = [
        "| reference model (vocab) | dtype | GPU x `--tensor-parallel-size` "
        "| `--gpu-memory-utilization` | model runner | default `--max-num-batched-tokens` "
        "| logits peak outside the profile, per GPU | free outside it (after the margin) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, vocab, dtype, gpu, tp, util in SIZING_ROWS:
        for runner in RUNNERS:
            b = step_token_budget(gpu.memory_bytes, vocab, util, dtype, runner)
            step = f"{b.tokens:,}" + (" (vLLM's)" if runner == "v2" else "")
            fits = "" if b.peak_bytes <= b.headroom_bytes else " (does not fit)"
            lines.append(
                f"| {name} ({vocab:,}) | {dtype} | {gpu.name} x {tp} | {util} "
                f"| {runner.upper()} | {step} | {b.peak_tokens:,} x {vocab:,} x "
                f"{b.bytes_per_token // vocab} B = {gb(b.peak_bytes)}{fits} "
                f"| {gb(b.headroom_bytes)} |"
            )
    return lines


def plans() -> list:
    return [
        plan_run(model, gpu, gpus=CLUSTER_GPUS, tensor_parallel_size=tp, rows=ROWS,
                 tokens_per_row=TOKENS_PER_ROW, gpu_tokens_per_s=gpu_demand(model.params),
                 runner=runner)
        for model, gpu, tp in PLANS for runner in RUNNERS
    ]


def plans_table() -> list[str]:
    lines = [
        "| reference on 8 GPUs | runner | `--num-workers` x `--tensor-parallel-size` "
        "| weights / GPU | KV of one step / GPU | vLLM budget / GPU (0.9) "
        "| `--max-num-batched-tokens` | logits peak / GPU (free outside) "
        "| budget left for activations and more KV | tokens/s | hours | render actors (load) "
        "| output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in plans():
        lines.append(
            f"| {p.model}, {p.gpu} | {p.runner.upper()} | {p.num_workers} x "
            f"{p.tensor_parallel_size} "
            f"| {gb(p.weights_bytes)} | {gb(p.kv_step_bytes)} | {gb(p.gpu_budget_bytes)} "
            f"| {p.max_num_batched_tokens:,} | {gb(p.logits_peak_bytes)} "
            f"({gb(p.headroom_bytes)}) | {gb(p.spare_bytes)} "
            f"| {p.tokens_per_s:,.0f} | {p.hours:.2f} | {p.render_actors} "
            f"({p.render_load:.0%}) | {gb(p.output_bytes)} |"
        )
    return lines


def main() -> None:
    print("\n".join(sizing_table()))
    print()
    print("\n".join(plans_table()))


if __name__ == "__main__":
    main()
