"""An output as flat arrays: every token end to end (Arrow list columns flattened into numpy)
plus row offsets, so a view over millions of tokens is a few numpy calls; and the rules applied to
it (the stored mask, a re-thresholded ProFit rule, a selection rule, two rules compared).

Example:
    >>> flat = load_flat("demo-out", tau=0.3)  # doctest: +SKIP
    >>> int(flat.masked.sum())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.rules.keep import (
    Resolved,
    Tokens,
    global_threshold_of,
    kept,
    resolve,
    resolve_parsed,
    rule_params,
)
from profit_prep.rules.profit import MaskRule, RuleParams, end_of_turn_tokens
from profit_prep.rules.selection import Rule, Select
from profit_prep.store.cache import local_output
from profit_prep.store.reader import check_shards, read_manifest
from profit_prep.store.schema import flat_list
from profit_prep.views.text import visible

CORE_COLUMNS = (
    "example_id",
    "source_index",
    "input_ids",
    "response_mask",
    "logprobs",
    "loss_mask",
    "truncated",
)
TOP1_COLUMN = "top1_id"  # optional signal column: the reference model's most likely token
# List columns of numbers that are token ids, not quantities: never a colour scale.
ID_COLUMNS = ("input_ids", TOP1_COLUMN)
PROB = "prob"  # the default colouring: exp(logprobs), with masked tokens marked


# -- loading ---------------------------------------------------------------------------------


@dataclass
class Flat:
    """All tokens of an output, flat, with per-example offsets.

    ``keep`` is the loss mask in use: the stored one, or the rule's when re-thresholded.
    ``masked`` tokens are response tokens the mask removes.
    """

    manifest: dict[str, Any]
    rule: MaskRule
    rethresholded: bool
    example_ids: list[str]
    source_index: np.ndarray  # int64 per example
    truncated: np.ndarray  # bool per example
    offsets: np.ndarray  # int64, n_examples + 1
    input_ids: np.ndarray  # int32 per token
    response: np.ndarray  # bool per token
    logprobs: np.ndarray  # float32 per token (NaN at position 0)
    keep: np.ndarray  # bool per token
    top1: np.ndarray | None = None  # int per token, when the output has a top1_id column
    stored_keep: np.ndarray | None = None  # the stored loss_mask, even when re-thresholded
    end_of_turn: np.ndarray | None = None  # bool per token: a response token closing a turn
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # extra per-token columns read

    @property
    def n_examples(self) -> int:
        return len(self.example_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logprobs.astype(np.float64))

    @property
    def masked(self) -> np.ndarray:
        return self.response & ~self.keep

    def row(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def column(self, name: str) -> np.ndarray:
        """One per-token quantity over all tokens: ``prob``, ``logprobs`` or a column read."""
        if name == PROB:
            return self.probs
        if name == "logprobs":
            return self.logprobs
        if name not in self.signals:
            raise InputError(f"column {name!r} was not read: load_flat(..., columns=[{name!r}])")
        return self.signals[name]


def read_table(
    out: str | Path, columns: Sequence[str] | None = None, shards: Sequence[int] | None = None
) -> pa.Table:
    """All shards of a finished output as one Arrow table (``top1_id`` added when present), or
    only the ``shards`` given (indices into the manifest's list, in that order)."""
    out = local_output(out)  # an output on an object store: its verified local copy
    manifest = read_manifest(out)
    files = _shard_files(out, manifest)
    # A shard copied over another, truncated or missing is refused, never shown (twice).
    check_shards(out, manifest)
    wanted = _wanted_columns(files[0], columns)
    tables = [_read_shard(out, files[i], wanted) for i in _shard_indices(files, shards)]
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:  # shards of different schemas
        raise InputError(f"{out}: damaged output: the shards' columns differ ({exc})") from None


def _shard_files(out: str | Path, manifest: dict[str, Any]) -> list[Path]:
    files = [Path(out) / s["file"] for s in manifest["shards"]]
    if not files:
        raise InputError(f"{out}: the output holds no shards")
    return files


def _shard_indices(files: Sequence[Path], shards: Sequence[int] | None) -> list[int]:
    if shards is None:
        return list(range(len(files)))
    bad = [i for i in shards if not 0 <= i < len(files)]
    if bad or not shards:
        raise IndexError(f"shards {list(shards)}: the output holds shards 0..{len(files) - 1}")
    return list(shards)


def _wanted_columns(first: Path, columns: Sequence[str] | None) -> list[str]:
    """The columns to read, as the first shard holds them (every shard must match it)."""
    names = set(pq.read_schema(first).names)
    wanted = [c for c in (columns or CORE_COLUMNS) if c in names]
    if TOP1_COLUMN in names and TOP1_COLUMN not in wanted:
        wanted.append(TOP1_COLUMN)
    return wanted


def _read_shard(out: str | Path, file: Path, wanted: Sequence[str]) -> pa.Table:
    try:
        return pq.read_table(file, columns=list(wanted))
    except (pa.ArrowException, OSError) as exc:  # a damaged page behind a valid footer
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"{out}: damaged output: {file.relative_to(out)} cannot be read ({reason}); "
            f"`profit-prep verify {out}` lists every problem"
        ) from None


def numeric_columns(out: str | Path) -> list[str]:
    """The stored per-token numeric columns of an output, in file order (token ids excepted).

    These are what ``color_by`` accepts besides ``prob``: ``logprobs`` always, and ``entropy``,
    ``top1_logprob``, ``rank`` when scored with ``--signals``.
    """
    out = local_output(out)
    manifest = read_manifest(out)
    if not manifest["shards"]:
        return ["logprobs"]
    check_shards(out, manifest, checksum=False)  # readable Parquet, as the manifest says
    schema = pq.read_schema(Path(out) / manifest["shards"][0]["file"])
    return [
        f.name
        for f in schema
        if pa.types.is_list(f.type)
        and f.name not in ID_COLUMNS
        and (pa.types.is_integer(f.type.value_type) or pa.types.is_floating(f.type.value_type))
    ]


def check_columns(out: str | Path, names: Sequence[str]) -> None:
    """Refuse, in one line, a column name the output does not hold."""
    available = numeric_columns(out)
    for name in names:
        if name != PROB and name not in available:
            more = len(available) == 1
            hint = " (score with --signals entropy,top1,rank for more)" if more else ""
            raise InputError(
                f"no per-token column {name!r} in {out}; choose from: "
                f"{', '.join([PROB, *available])}{hint}"
            )


def _prepare(
    out: str | Path, columns: Sequence[str], params: RuleParams
) -> tuple[dict[str, Any], Resolved, list[str]]:
    """The manifest, the rule resolved against it and the extra columns to read, all checked
    before any token is read."""
    manifest = read_manifest(out)
    resolved = resolve(manifest, params)
    extra = [c for c in dict.fromkeys(columns) if c not in (PROB, "logprobs")]
    check_columns(out, extra)
    return manifest, resolved, extra


def load_flat(
    out: str | Path,
    *,
    columns: Sequence[str] = (),
    shards: Sequence[int] | None = None,
    rule: RuleParams | None = None,
    **params: Any,
) -> Flat:
    """Read an output into a :class:`Flat`; a rule parameter given (``rule=RuleParams(...)``, or
    MaskRule's fields as keywords: ``tau=0.3``) re-thresholds the mask.

    ``columns`` names extra per-token columns to read into ``Flat.signals`` (see
    :func:`numeric_columns`); ``prob`` and ``logprobs`` are always there. ``shards`` reads only
    those shards (indices into the manifest's list); :func:`iter_flat` reads one at a time.
    """
    out = local_output(out)
    manifest, resolved, extra = _prepare(out, columns, rule_params(rule, **params))
    table = read_table(out, [*CORE_COLUMNS, *extra], shards)
    return _flat_of(table, manifest, resolved, extra)


def iter_flat(
    out: str | Path, *, columns: Sequence[str] = (), rule: RuleParams | None = None, **params: Any
) -> Iterator[Flat]:
    """The output as one :class:`Flat` per shard, in order: what :func:`load_flat` gives, in
    pieces, so a view that accumulates (``stats``) holds one shard in memory, not the output.

    Everything that can be refused (rule, columns, the shards' checksums) is checked here, once,
    before the first shard is read; a row's mask does not depend on its shard (``random`` draws
    per example id and position).
    """
    out = local_output(out)
    manifest, resolved, extra = _prepare(out, columns, rule_params(rule, **params))
    files = _shard_files(out, manifest)
    check_shards(out, manifest)
    wanted = _wanted_columns(files[0], [*CORE_COLUMNS, *extra])
    return _iter_shards(out, files, wanted, manifest, resolved, extra)


def _iter_shards(
    out: str | Path,
    files: Sequence[Path],
    wanted: Sequence[str],
    manifest: dict[str, Any],
    resolved: Resolved,
    extra: Sequence[str],
) -> Iterator[Flat]:
    schema = None
    for file in files:
        table = _read_shard(out, file, wanted)
        # What concat_tables refuses in read_table: shards of different schemas.
        if schema is None:
            schema = table.schema
        elif not table.schema.equals(schema):
            raise InputError(f"{out}: damaged output: the shards' columns differ "
                             f"({file.relative_to(out)} and {files[0].relative_to(out)})")
        flat = _flat_of(table, manifest, resolved, extra)
        del table  # held here, the previous shard would live on while the next one is read
        yield flat
        del flat


def _flat_of(
    table: pa.Table, manifest: dict[str, Any], resolved: Resolved, extra: Sequence[str]
) -> Flat:
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks())
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    np.cumsum(lengths.to_numpy(zero_copy_only=False), out=offsets[1:])
    example_ids = table.column("example_id").to_pylist()
    response = flat_list(table.column("response_mask"))[0].astype(bool)
    logprobs = flat_list(table.column("logprobs"))[0].astype(np.float32)
    stored_keep = flat_list(table.column("loss_mask"))[0].astype(bool)
    input_ids = flat_list(table.column("input_ids"))[0].astype(np.int32)
    end_ids = (manifest.get("render") or {}).get("end_of_turn_ids") or []
    tokens = Tokens(input_ids, response, logprobs, np.diff(offsets), example_ids, stored_keep)
    # The stored mask as it is; a recomputed one through the rule layer, like load's.
    keep = kept(resolved, tokens) if resolved.rethresholded else stored_keep
    top1 = flat_list(table.column(TOP1_COLUMN))[0] if TOP1_COLUMN in table.column_names else None
    return Flat(
        manifest=manifest,
        rule=resolved.profit,
        rethresholded=resolved.rethresholded,
        example_ids=example_ids,
        source_index=table.column("source_index").to_numpy(),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        offsets=offsets,
        input_ids=input_ids,
        response=response,
        logprobs=logprobs,
        keep=keep,
        top1=top1,
        stored_keep=stored_keep,
        end_of_turn=end_of_turn_tokens(input_ids, response, end_ids),
        signals={c: flat_list(table.column(c))[0] for c in extra},
    )


def load_output_tokenizer(out: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer recorded in the manifest (``tokenizer.path``), or ``override``."""
    from profit_prep.rendering.renderer import load_tokenizer

    path = override or read_manifest(local_output(out)).get("tokenizer", {}).get("path")
    if not path:
        raise InputError(f"{out}: the manifest names no tokenizer; pass --tokenizer")
    if override is None and not Path(str(path)).exists():
        raise InputError(
            f"tokenizer {visible(str(path))} (from the manifest) is absent here; pass --tokenizer"
        )
    return load_tokenizer(path)


def rule_keep(flat: Flat, rule: Rule) -> np.ndarray:
    """The response tokens a rule keeps, over every token of ``flat`` (the whole output): what
    ``load`` keeps with that rule (:func:`profit_prep.rules.keep.kept`), a global ``top`` with its
    exact threshold over ``flat``."""
    if isinstance(rule, Select) and rule.signal == "excess_loss":
        raise InputError("signal excess_loss needs a reference output; load(reference=...) has it")
    resolved = resolve_parsed(flat.manifest, rule)
    signal = None
    if isinstance(rule, Select) and rule.signal not in (PROB, "loss"):
        signal = flat.column(rule.column() or rule.signal)
    stored = flat.stored_keep if flat.stored_keep is not None else flat.keep
    tokens = Tokens(flat.input_ids, flat.response, flat.logprobs, flat.lengths, flat.example_ids,
                    stored, signal)
    threshold = global_threshold_of(rule, [tokens])
    return kept(resolved, tokens, threshold)


# Per response token: which of two rules keep it. Non-response tokens are -1.
BOTH, A_ONLY, B_ONLY, NEITHER = 0, 1, 2, 3
CATEGORY_NAMES = ("both", "A only", "B only", "neither")


@dataclass(frozen=True)
class Comparison:
    """Two rules applied to the same tokens; ``category`` per token (:data:`BOTH` ...)."""

    a: Rule
    b: Rule
    category: np.ndarray  # int8 per token

    def counts(self, s: slice | None = None) -> dict[str, int]:
        """Response tokens per category, of one example (``flat.row(i)``) or the whole output."""
        cat = self.category if s is None else self.category[s]
        n = np.bincount(cat[cat >= 0], minlength=4)
        return dict(zip(CATEGORY_NAMES, (int(x) for x in n)))


def compare_rules(flat: Flat, a: Rule, b: Rule) -> Comparison:
    """Which response tokens ``a`` and ``b`` keep: both, ``a`` only, ``b`` only, neither."""
    ka, kb = rule_keep(flat, a), rule_keep(flat, b)
    category = np.where(ka, np.where(kb, BOTH, A_ONLY), np.where(kb, B_ONLY, NEITHER))
    return Comparison(a, b, np.where(flat.response, category, -1).astype(np.int8))


