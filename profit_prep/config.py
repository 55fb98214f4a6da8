"""``ScoreConfig``: everything ``profit-prep score`` and :func:`profit_prep.score` take.

One dataclass for the CLI, the Python API and config files (``pipelines/load_config.py``): each
field's ``help`` is its ``--flag``'s help, so they cannot drift apart.

Example:
    >>> config = ScoreConfig(data="train.jsonl", out="out", tau=0.2)
    >>> config.mask_rule().to_dict()
    {'strategy': 'higher', 'tau': 0.2, 'protect': 'end_of_turn'}
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from profit_prep.errors import InputError
from profit_prep.inputs.formats import (
    FORMATS,
    FieldMap,
)
from profit_prep.rules.profit import MaskRule
from profit_prep.scorers.gpu import DTYPES


@dataclass
class ScoreConfig:
    """Everything ``profit-prep score`` takes. Field docs double as the CLI's ``--help``."""

    data: str = field(
        metadata={"help": "input: .jsonl, .json, .parquet, a saved dataset, or a hub name"}
    )
    out: str = field(metadata={"help": "output directory (Parquet shards + manifest.json)"})
    model: str = field(
        default="builtin:smollm2",
        metadata={"help": "reference model folder, or builtin:smollm2 (SmolLM2-135M-Instruct)"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "the trainer's tokenizer folder (default: the model's)"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template file (default: the tokenizer's)"}
    )
    format: str = field(default="auto", metadata={"help": f"input format: {', '.join(FORMATS)}"})
    prompt_field: str | None = field(default=None, metadata={"help": "column with the prompt"})
    response_field: str | None = field(default=None, metadata={"help": "column with the response"})
    system_field: str | None = field(default=None, metadata={"help": "column with a system prompt"})
    id_field: str | None = field(
        default=None, metadata={"help": "column with a stable row id (default: the row index)"}
    )
    split: str = field(default="train", metadata={"help": "split of a saved or hub dataset"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N rows"})
    max_length: int = field(default=4096, metadata={"help": "truncate rendered rows to N tokens"})
    strategy: str = field(
        default="higher", metadata={"help": "mask rule: higher, lower, middle, random"}
    )
    tau: float = field(default=0.1, metadata={"help": "probability threshold (higher/lower)"})
    tau_low: float | None = field(default=None, metadata={"help": "band floor (middle)"})
    tau_high: float | None = field(default=None, metadata={"help": "band ceiling (middle)"})
    keep_fraction: float = field(default=0.5, metadata={"help": "fraction kept (random)"})
    seed: int = field(default=0, metadata={"help": "seed of the random strategy"})
    protect: str = field(
        default="end_of_turn",
        metadata={"help": "end_of_turn: every assistant turn's end-of-turn token stays in the "
                  "loss whatever its probability (an offline reference rarely expects the "
                  "data's endings: 91%% of the demo's were masked); none: the paper's rule "
                  "exactly"},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "scorer: auto (vLLM where installed and measured faster here: a GPU, or "
                  "a CPU with AVX-512; else transformers; one line says which and why; "
                  "$PROFIT_PREP_BACKEND overrides auto), transformers or vllm (null: every "
                  "logprob 0, no model: benchmarks of the pipeline's own cost only)"},
    )
    signals: str | None = field(
        default=None,
        metadata={"help": "extra per-token columns, comma list of entropy (nats; exact with "
                  "transformers, a top-k lower bound with vllm/--server), top1 (top1_id, "
                  "top1_logprob), rank"},
    )
    signals_top_k: int = field(
        default=20,
        metadata={"help": "vllm/--server with --signals: prompt logprobs per position the "
                  "signals come from (above 20 needs a server started with --max-logprobs)"},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (default): bfloat16 on a CUDA GPU (float16 where it has no bf16), "
                  "float32 on CPU; the first output lines and the manifest say which and why. "
                  "Or float32, bfloat16, float16. vLLM bf16 on a CPU with AVX512-BF16: ~1.2x "
                  "fp32, and the tau=0.1 mask agrees with fp32 on ~99.4%% of tokens (SmolLM2, "
                  "docs/benchmarks.md); without AVX512-BF16 it is emulated and several times "
                  "slower",
                  "choices": DTYPES},
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: auto)"})
    compile: bool = field(
        default=False,
        metadata={"help": "transformers: torch.compile with frozen weights (0.94x on an AVX2 CPU "
                  "after a ~2.5 min compile, docs/benchmarks.md; try it on larger CPUs)"},
    )
    shard_size: int = field(default=1000, metadata={"help": "input rows per output shard"})
    num_workers: int = field(
        default=0,
        metadata={"help": "Ray scoring actors; 0 scores in this process without Ray"},
    )
    render_workers: int | None = field(
        default=None,
        metadata={"help": "Ray: render actors (read, chat template, tokenize) on the driver's "
                  "node (default: 1, which Ray Data grows up to --num-workers when they fall "
                  "behind); one feeds ~12 GPUs scoring an 8B model (docs/scaling.md)"},
    )
    cpus_per_worker: float | None = field(
        default=None,
        metadata={"help": "Ray: CPUs per scoring actor (default: 1 with a GPU, else the "
                  "local CPUs split between the workers)"},
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm: fraction of GPU memory the engine may take"}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "vllm: GPUs per engine (tensor parallel); Ray gives each "
                             "scoring actor this many GPUs"}
    )
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={"help": "vllm: tokens per engine step; bound it for big vocabularies, since "
                  "prompt logprobs are not counted in vLLM's memory profiling"},
    )
    enable_prefix_caching: bool = field(
        default=False, metadata={"help": "vllm: reuse KV of shared prefixes (no effect on "
                                 "prompt-logprob requests, which skip the cache)"}
    )
    server: str | None = field(
        default=None,
        metadata={"help": "score through running vLLM OpenAI servers: URL[,URL...] "
                  "(load-balanced); --tokenizer (or --model) then names the trainer's tokenizer"},
    )
    server_model: str | None = field(
        default=None, metadata={"help": "model name on the server (default: the one it serves)"}
    )
    api_key: str | None = field(
        default=None,
        metadata={"help": "server API key (better: set $PROFIT_PREP_API_KEY); never stored"},
    )
    max_in_flight: int = field(default=16, metadata={"help": "server: requests in flight"})
    request_timeout: float = field(
        default=300.0,
        metadata={"help": "server: seconds one request may take, connect to last byte; one that "
                  "times out is tried once more, then the run stops with an error, so a hung "
                  "server stops it within about twice this. 300 s leaves room for a long row "
                  "queued behind full batches on a busy server"},
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join (default: $RAY_ADDRESS, else a local one)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})
    quiet: bool = field(default=False, metadata={"help": "no progress output"})

    def mask_rule(self) -> MaskRule:
        return MaskRule(
            self.strategy, self.tau, self.tau_low, self.tau_high, self.keep_fraction, self.seed,
            self.protect,
        )

    def fields(self) -> FieldMap:
        return FieldMap(self.prompt_field, self.response_field, self.system_field, self.id_field)


# Options that must be at least this much: 0 or a negative number is refused with one line
# (``--limit 0`` once meant "every row" and ``--limit -1`` an empty finished output).
_AT_LEAST = {
    "limit": 1, "shard_size": 1, "max_length": 2, "max_in_flight": 1, "signals_top_k": 1,
    "tensor_parallel_size": 1, "num_workers": 0, "render_workers": 1, "max_num_batched_tokens": 1,
}


def check_numbers(config: ScoreConfig) -> None:
    """Refuse numeric options outside their range, and values outside a field's declared
    ``choices`` (the same list argparse checks), naming the flag (before any work starts)."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise InputError(f"--{f.name.replace('_', '-')} {getattr(config, f.name)!r}: choose "
                             f"{', '.join(choices)}")
    for name, least in _AT_LEAST.items():
        value = getattr(config, name)
        if value is not None and value < least:
            hint = " (omit it to score every row)" if name == "limit" else ""
            raise InputError(f"--{name.replace('_', '-')} must be at least {least}{hint}, "
                             f"got {value}")
    for name in ("cpus_per_worker", "request_timeout"):
        value = getattr(config, name, None)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 < config.gpu_memory_utilization <= 1:
        raise InputError("--gpu-memory-utilization must be in (0, 1], got "
                         f"{config.gpu_memory_utilization}")
