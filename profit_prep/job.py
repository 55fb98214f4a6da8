"""Score a dataset end to end: read -> render -> score -> mask -> Parquet shards.

Each step is a small function with one data contract, so the single-process loop here and the Ray
pipeline (:mod:`profit_prep.executors.ray`) chain the same steps. Work is cut into shards of
``shard_size`` input rows; a finished shard is a file, so a rerun of the same command resumes.

Example:
    >>> from profit_prep import ScoreConfig, score
    >>> summary = score(ScoreConfig(data="train.jsonl", out="out", model="builtin:smollm2",
    ...                             prompt_field="question", response_field="answer"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep import __version__
from profit_prep.config import ScoreConfig, check_numbers
from profit_prep.errors import InputError, RowError
from profit_prep.executors.placement import check_tensor_parallel
from profit_prep.inputs import remote
from profit_prep.inputs.checks import escape_text
from profit_prep.inputs.duplicate_ids import find_duplicates
from profit_prep.inputs.formats import (
    FORMATS,
    FieldMap,
    detect_row_format,
    row_tools,
    to_messages,
)
from profit_prep.inputs.preflight import check_format, check_template
from profit_prep.inputs.sources import RawRow, Source, open_source
from profit_prep.rendering.renderer import Rendered, Renderer, end_of_turn_ids
from profit_prep.rendering.tokenizer import load_tokenizer, resolve_template
from profit_prep.rendering.tokenizer import tokenizer_fingerprint as fingerprint_of
from profit_prep.rules.profit import MaskRule, end_of_turn_tokens, loss_mask
from profit_prep.scorers.base import Scorer, signal_columns
from profit_prep.scorers.choose import (
    check_signals,
    choose_backend,
    choose_dtype,
    make_scorer,
    scorer_class,
    top_k_backend,
)
from profit_prep.scorers.models import resolve_model
from profit_prep.store.outputs import Output, read_run_params
from profit_prep.store.schema import COLUMN_DOCS, SIGNAL_DOCS, ScoredExample, to_table
from profit_prep.store.urls import is_url


def rejection(row: RawRow, reason: str) -> dict[str, Any]:
    """A rejected row's record; text that is not valid Unicode is written escaped (``\\ud800``),
    so the side file can always be written."""
    return {"example_id": escape_text(row.example_id), "source_index": row.index,
            "reason": escape_text(reason)}


def render_rows(
    rows: list[RawRow],
    fmt: str,
    fields: FieldMap,
    renderer: Renderer,
    duplicates: dict[int, int] | None = None,
) -> tuple[list[tuple[RawRow, Rendered]], list[dict[str, Any]]]:
    """Step 1: raw rows -> rendered examples, and rejections with their reasons.

    ``fmt`` ``auto`` detects each row's format from its own keys (a row of none is rejected);
    every rendered row's ``fmt`` says which format it was read as. ``duplicates`` maps a row
    index to the index of the earlier row with the same id.
    """
    rendered, rejected = [], []
    auto = fmt == "auto"
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
            row.fmt = detect_row_format(row.data, fields) if auto else fmt
            messages = to_messages(row.data, row.fmt, fields)
            rendered.append((row, renderer.render(messages, row_tools(row.data))))
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


def write_scored_shard(
    out: Output,
    index: int,
    rendered: list[tuple[RawRow, Rendered]],
    logprobs: list[np.ndarray],
    rule: MaskRule,
    extras: list[dict[str, np.ndarray]] | None,
    end_of_turn_ids: Sequence[int],
    rejected: list[dict[str, Any]],
    input_digest: str,
) -> None:
    """Step 3 and the write, as both drivers end a shard: mask, then one atomic shard file with
    its input digest and counts (end-of-turn tokens, rows per input format) in the footer."""
    examples = mask_examples(rendered, logprobs, rule, extras, end_of_turn_ids)
    out.write_shard(index, to_table(examples), rejected, input_digest, end_of_turn_ids,
                    [row.fmt for row, _ in rendered])


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
    backend_reason: str = ""
    end_of_turn_ids: list[int] = field(default_factory=list)
    dtype_reason: str = ""
    input_stamp: list[list[Any]] = field(default_factory=list)
    _duplicates: dict[int, int] | None = field(default=None, repr=False)
    # The scorer the backend's pre-flight built to check (a server's), until an executor takes it.
    checked_scorer: Scorer | None = field(default=None, repr=False)

    @property
    def duplicates(self) -> dict[int, int]:
        """Row index -> index of the earlier row with the same id (:func:`find_duplicates`).

        Found on first use: a rerun with nothing left to score never reads the ids.
        """
        if self._duplicates is None:
            ids = self.config.id_field is not None
            self._duplicates = find_duplicates(self.source, self.n_rows) if ids else {}
        return self._duplicates

    def backend_line(self) -> str:
        """The lines that say which scorer runs, in which dtype, and why."""
        line = f"backend     {self.params['backend']} ({self.backend_reason})"
        if self.dtype_reason:
            line += f"\ndtype       {self.params['dtype']} ({self.dtype_reason})"
        return line

    @property
    def scorer_class(self) -> type[Scorer]:
        """The backend's class: its set-up (worker environment, CPU binding, import check)."""
        return scorer_class(self.config)

    def make_scorer(self) -> Scorer:
        """A new scorer of this job's backend (each Ray scoring actor builds its own)."""
        return make_scorer(self.config, self.model_dir)

    def start_scorer(self) -> tuple[Scorer, Prepared]:
        """The scorer of an in-process run: the one the pre-flight checked, else a new one.
        Under ``auto``, a vLLM that does not start falls back to transformers with one warning
        line instead of failing the run (the job returned then says so)."""
        if self.checked_scorer is not None:
            scorer, self.checked_scorer = self.checked_scorer, None
            return scorer, self
        try:
            return self.make_scorer(), self
        except Exception as exc:  # noqa: BLE001 - any engine start failure, when auto chose vLLM
            if not (self.backend_reason.startswith("auto") and self.config.backend == "vllm"):
                raise
            first = " ".join(str(exc).split())[:200] or type(exc).__name__
            print(f"warning: vLLM did not start ({first}); scoring with transformers instead",
                  file=sys.stderr)
            prepared = self.fall_back_to_transformers()
            return prepared.make_scorer(), prepared

    def fall_back_to_transformers(self) -> Prepared:
        """The same job on the transformers backend (``auto`` when vLLM does not start)."""
        config = replace(self.config, backend="transformers")
        return replace(self, config=config, params={**self.params, "backend": "transformers"},
                       backend_reason="auto: vLLM did not start here")

    def for_workers(self, *, inputs: bool) -> Prepared:
        """This job as pickled for worker processes: never a scorer built here, and without
        ``inputs`` no source and renderer either (a worker that neither reads nor renders then
        unpickles it without importing transformers). Duplicates are found here, once."""
        duplicates = self.duplicates
        if inputs:
            return replace(self, checked_scorer=None, _duplicates=duplicates)
        return replace(self, checked_scorer=None, _duplicates={},
                       source=None, renderer=None)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close a checked scorer no executor took (a Ray run, a failed start)."""
        if self.checked_scorer is not None:
            self.checked_scorer.close()
            self.checked_scorer = None

    @property
    def n_rows(self) -> int:
        return min(len(self.source), self.config.limit or len(self.source))

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_rows // self.config.shard_size))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.config.shard_size
        return start, min(start + self.config.shard_size, self.n_rows)

    def pending(self, out: Output) -> tuple[list[int], int]:
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

    def check_input_unchanged(self) -> None:
        """Refuse to finish when the input was written to since this run opened it (before the
        manifest is written): rows read before and after the write would mix two versions."""
        if input_stamp(self.config.data, self.config.out) != self.input_stamp:
            raise InputError(
                f"{self.config.data} changed while this run was reading it (its size, times or "
                "files differ from when the run started): the shards may hold rows of both "
                "versions, so no manifest is written; restore the input and rerun to resume "
                "(each shard is checked against it), or score the new one with --overwrite"
            )


def input_stamp(data: str, out: str | None = None) -> list[list[Any]]:
    """What any write to a local input changes: per file (a folder's files, recursively, but
    none inside ``out``, which this run writes), its path, device, inode, size, and mtime and
    ctime in ns. Empty for a hub dataset. On an object store, each object's size, ETag and
    version instead (:func:`profit_prep.inputs.remote.stamp`)."""
    if is_url(data):
        return remote.stamp(data, out)
    path = Path(data)
    if not path.exists():
        return []
    files = [path]
    if path.is_dir():
        skip = Path(out).resolve() if out else None
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not (skip and f.resolve().is_relative_to(skip)))
    stamp = []
    for f in files:
        st = f.stat()
        stamp.append([str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return stamp


def prepare(config: ScoreConfig) -> Prepared:
    """Resolve the backend, model, tokenizer, template and input; fail early with one line.

    ``Prepared.config`` is ``config`` with ``backend="auto"`` replaced by the backend chosen.
    """
    check_numbers(config)
    started = _started_params(config)
    _check_identity_scheme(config, started)
    backend, reason = choose_backend(config, resumed=started.get("backend"))
    config = replace(config, backend=backend)
    check_tensor_parallel(backend, config.tensor_parallel_size, reason)
    dtype, dtype_reason = choose_dtype(config, resumed=started.get("dtype"))
    if dtype_reason.startswith("auto: resuming"):  # the scorers then load that dtype too
        config = replace(config, dtype=dtype)
    rule = config.mask_rule()
    signals = check_signals(config)
    stamp = input_stamp(config.data, config.out)  # before the first read: later writes show
    # An object-store input is read from a verified local copy (profit_prep.inputs.remote).
    local = remote.local_copy(config.data, config.out, stamp) if is_url(config.data) else None
    source = open_source(local or config.data, id_field=config.id_field, split=config.split)
    if len(source) == 0:
        raise InputError(f"{config.data}: no rows")
    fmt = check_format(source, config)
    if fmt == "auto" and started.get("format") in FORMATS[1:]:
        # An output started with a named --format resumes in it under the default auto
        # (tests/test_pipeline.py; outputs of when auto recorded a row's format are refused).
        fmt = started["format"]
    # With --server the model is remote; the local folder only supplies the tokenizer.
    model_dir = resolve_model((config.tokenizer or config.model) if config.server else config.model)
    tokenizer_dir = resolve_model(config.tokenizer) if config.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    template, template_source = resolve_template(tokenizer, config.chat_template)
    renderer = Renderer(tokenizer, template, config.max_length)
    if renderer.chat_template != template:  # e.g. an empty file: what renders is recorded
        template, template_source = resolve_template(tokenizer, None)
    fingerprint = fingerprint_of(tokenizer, template)
    checked = scorer_class(config).preflight(config, model_dir, tokenizer, started)
    model, probe = checked.model, checked.probe
    model_hash = model["content_hash"]
    params = {
        "data": str(Path(config.data).resolve()) if Path(config.data).exists() else config.data,
        "input_rows": len(source),
        "limit": config.limit,
        "format": fmt,
        "fields": asdict(config.fields()),
        "identity": IDENTITY_SCHEME,
        "model_hash": model_hash,
        "tokenizer_fingerprint": fingerprint["fingerprint"],
        "max_length": config.max_length,
        "mask": rule.to_dict(),
        "backend": "server" if config.server else config.backend,
        "dtype": dtype,
        "shard_size": config.shard_size,
    }
    if probe is not None:
        params["model_probe"] = probe
    if signals:  # only when set, so outputs written before signals existed still resume
        params["signals"] = list(signals)
        if top_k_backend(config):  # k changes the entropy estimate
            params["signals_top_k"] = config.signals_top_k
    columns = _column_docs(config, signals)
    template_hash = hashlib.sha256(template.encode("utf-8")).hexdigest()
    manifest = {
        "profit_prep_version": __version__,
        "model": model,
        "tokenizer": {"path": str(tokenizer_dir), **fingerprint},
        "chat_template": {"source": template_source, "sha256": template_hash, "text": template},
        "mask": rule.to_dict(),
        "render": {"max_length": config.max_length, "format": fmt, **asdict(config.fields())},
        "input": {"path": params["data"], "rows": len(source), "limit": config.limit},
        "columns": columns,
    }
    check_template(renderer, source, fmt, config.fields())
    eot = end_of_turn_ids(renderer)
    manifest["render"]["end_of_turn_ids"] = eot
    return Prepared(config, source, fmt, model_dir, renderer, params, manifest,
                    backend_reason=reason, end_of_turn_ids=eot, input_stamp=stamp,
                    dtype_reason="" if config.server else dtype_reason,
                    checked_scorer=checked.scorer)


# Bumped when what identifies the model or tokenizer in run.json changes: an output started
# under another scheme cannot be shown to match, so it is not resumed (docs/format.md).
IDENTITY_SCHEME = 2


def _column_docs(config: ScoreConfig, signals: Sequence[str]) -> dict[str, str]:
    """The manifest's column descriptions: the standard ones and the signals stored."""
    columns = dict(COLUMN_DOCS)
    columns.update({c: SIGNAL_DOCS[c] for c in signal_columns(signals)})
    if "entropy" in signals and top_k_backend(config):
        columns["entropy"] = (
            f"entropy (nats) of the reference distribution that predicted token t, estimated "
            f"from its top {config.signals_top_k} logprobs (a lower bound; see "
            "scorer.entropy_estimator); NaN at t = 0"
        )
    return columns


def _check_identity_scheme(config: ScoreConfig, started: dict[str, Any]) -> None:
    """An output started by an earlier profit-prep (a sampled model hash, a tokenizer
    fingerprint without normalizer and merges) is not resumed: nothing shows that its shards
    were scored by the same model and tokenizer as the rest would be."""
    if not started or started.get("identity") == IDENTITY_SCHEME:
        return
    sampled = str(started.get("model_hash", "")).startswith("sha256:")
    how = "by sampled bytes of its weights" if sampled else "by the name its server reports"
    raise InputError(
        f"{config.out} was started by an earlier profit-prep, whose run.json identifies the "
        f"model {how} and the tokenizer without its normalizer and merges, so resuming cannot "
        "prove the rest would be scored alike: finish it with the version that started it, or "
        "start again with --overwrite (or another --out)"
    )


def _started_params(config: ScoreConfig) -> dict[str, Any]:
    """The parameters an unfinished or finished output in ``--out`` was started with, if any:
    a resume keeps choices that ``auto`` would make differently now (backend, format)."""
    # Read first: a --out URL the writer would refuse is refused here, before a model loads.
    # No output yet, or a damaged one: {} (the writer says so with one line).
    params = read_run_params(config.out)
    return {} if config.overwrite else params

