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
from typing import Any

from profit_prep.errors import InputError
from profit_prep.inputs.formats import (
    FORMATS,
    FieldMap,
)
from profit_prep.options import check_choices, include_fields
from profit_prep.rules.profit import MaskRule
from profit_prep.scorers.gpu import DTYPES


@dataclass
@include_fields(MaskRule, after="max_length")  # strategy, tau, ...: declared by MaskRule
class ScoreConfig:
    """Everything ``profit-prep score`` takes. Field docs double as the CLI's ``--help``.

    Each field's ``metadata``: ``help`` (its ``--flag``'s help), ``choices`` (checked by argparse
    and by ``__post_init__`` alike). The fields by section (``score --help`` groups them so):
    """

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
    format: str = field(default="auto", metadata={"help": "input row shape", "choices": FORMATS})
    prompt_field: str | None = field(default=None, metadata={"help": "column with the prompt"})
    response_field: str | None = field(default=None, metadata={"help": "column with the response"})
    system_field: str | None = field(default=None, metadata={"help": "column with a system prompt"})
    id_field: str | None = field(
        default=None, metadata={"help": "column with a stable row id (default: the row index)"}
    )
    split: str = field(default="train", metadata={"help": "split of a saved or hub dataset"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N rows"})
    max_length: int = field(default=4096, metadata={"help": "truncate rendered rows to N tokens"})
    backend: str = field(
        default="auto",
        metadata={"help": "scorer: auto (vLLM where installed and measured faster here: a GPU, or "
                  "a CPU with AVX-512; else transformers; one line says which and why; "
                  "$PROFIT_PREP_BACKEND overrides auto), transformers or vllm (null: every "
                  "logprob 0, no model: benchmarks of the pipeline's own cost only; server: "
                  "what --server URL sets)",
                  "choices": ("auto", "transformers", "vllm", "server", "null")},
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
    device: str | None = field(
        default=None, metadata={"help": "default: auto", "choices": ("cpu", "cuda")}
    )
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

    def __post_init__(self) -> None:
        check_choices(self)  # the choices argparse checks for the CLI, checked for the API too
        if self.backend == "server" and not self.server:
            raise InputError("--backend server scores against running vLLM servers: give their "
                             "URLs with --server URL")

    def mask_rule(self) -> MaskRule:
        """The ProFit rule of this run (its fields are :class:`MaskRule`'s)."""
        return MaskRule(**{f.name: getattr(self, f.name) for f in fields(MaskRule)})

    def fields(self) -> FieldMap:
        return FieldMap(self.prompt_field, self.response_field, self.system_field, self.id_field)



# The sections of ScoreConfig's fields: ``score --help`` groups the flags so, and the class
# docstring lists them (every field is in exactly one; tests/test_config.py checks).
SECTIONS: dict[str, tuple[str, ...]] = {
    "input": ("data", "format", "prompt_field", "response_field", "system_field", "id_field",
              "split", "limit"),
    "output": ("out", "shard_size", "overwrite", "quiet"),
    "model and rendering": ("model", "tokenizer", "chat_template", "max_length"),
    "mask rule (profit_prep.MaskRule)": tuple(f.name for f in fields(MaskRule)),
    "scoring": ("backend", "signals", "signals_top_k", "dtype", "device", "compile"),
    "vllm engine": ("gpu_memory_utilization", "tensor_parallel_size", "max_num_batched_tokens",
                    "enable_prefix_caching"),
    "vllm server (--server)": ("server", "server_model", "api_key", "max_in_flight",
                               "request_timeout"),
    "ray (--num-workers)": ("num_workers", "render_workers", "cpus_per_worker", "ray_address"),
}


def _document_sections(cls: type) -> None:
    """Append every field, by section, with its help and choices, to ``cls``'s docstring."""
    by_name = {f.name: f for f in fields(cls)}
    lines = [cls.__doc__ or ""]
    for title, names in SECTIONS.items():
        lines.append(f"\n    > {title}")
        for name in names:
            meta: Any = by_name[name].metadata
            choices = f" Choices: {', '.join(map(str, meta['choices']))}." if "choices" in meta \
                else ""
            help_text = str(meta.get("help", "")).replace("%%", "%")
            lines.append(f"    {name}: {help_text}.{choices}".replace("..", "."))
    cls.__doc__ = "\n".join(lines) + "\n"


_document_sections(ScoreConfig)

# Options that must be at least this much: 0 or a negative number is refused with one line
# (``--limit 0`` once meant "every row" and ``--limit -1`` an empty finished output).
_AT_LEAST = {
    "limit": 1, "shard_size": 1, "max_length": 2, "max_in_flight": 1, "signals_top_k": 1,
    "tensor_parallel_size": 1, "num_workers": 0, "render_workers": 1, "max_num_batched_tokens": 1,
}


def check_numbers(config: ScoreConfig) -> None:
    """Refuse numeric options outside their range, and values outside a field's declared
    ``choices`` (the same list argparse checks), naming the flag (before any work starts)."""
    check_choices(config)  # again: a field may have been set after construction
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
