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
from profit_prep.rules import selection as rules
from profit_prep.rules.profit import MaskRule, apply_rule, end_of_turn_ids_of, end_of_turn_tokens
from profit_prep.rules.profit import resolve_rule as resolve_stored_rule
from profit_prep.rules.selection import Rule
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


# The rule parameters every view takes (``--strategy``, ``--tau``, ... ``--protect``).
RULE_PARAMETERS = ("strategy", "tau", "tau_low", "tau_high", "keep_fraction", "seed", "protect")


def resolve_rule(manifest: dict[str, Any], **overrides: Any) -> tuple[MaskRule, bool]:
    """The stored rule with the given parameters (see
    :func:`profit_prep.rules.profit.resolve_rule`),
    and True when one was given.

    >>> rule, changed = resolve_rule({"mask": {"strategy": "higher", "tau": 0.1}}, tau=0.3)
    >>> rule.strategy, rule.tau, changed
    ('higher', 0.3, True)
    """
    rule = resolve_stored_rule(manifest.get("mask"), **overrides)
    return rule, any(v is not None for v in overrides.values())


def _prepare(
    out: str | Path, columns: Sequence[str], rule: dict[str, Any]
) -> tuple[dict[str, Any], MaskRule, bool, list[str]]:
    """The manifest, the rule in use (and whether it was given) and the extra columns to read,
    all checked before any token is read."""
    unknown = sorted(set(rule) - set(RULE_PARAMETERS))
    if unknown:
        raise TypeError(f"load_flat got unknown rule parameters {unknown}")
    manifest = read_manifest(out)
    rule_used, changed = resolve_rule(manifest, **rule)
    extra = [c for c in dict.fromkeys(columns) if c not in (PROB, "logprobs")]
    check_columns(out, extra)
    return manifest, rule_used, changed, extra


def load_flat(
    out: str | Path,
    *,
    columns: Sequence[str] = (),
    shards: Sequence[int] | None = None,
    **rule: Any,
) -> Flat:
    """Read an output into a :class:`Flat`; any rule parameter given (``strategy``, ``tau``,
    ``tau_low``, ``tau_high``, ``keep_fraction``, ``seed``, ``protect``) re-thresholds the mask.

    ``columns`` names extra per-token columns to read into ``Flat.signals`` (see
    :func:`numeric_columns`); ``prob`` and ``logprobs`` are always there. ``shards`` reads only
    those shards (indices into the manifest's list); :func:`iter_flat` reads one at a time.
    """
    manifest, rule_used, changed, extra = _prepare(out, columns, rule)
    table = read_table(out, [*CORE_COLUMNS, *extra], shards)
    if changed:
        end_of_turn_ids_of(manifest, rule_used)  # a clear error when it cannot protect
    return _flat_of(table, manifest, rule_used, changed, extra)


def iter_flat(out: str | Path, *, columns: Sequence[str] = (), **rule: Any) -> Iterator[Flat]:
    """The output as one :class:`Flat` per shard, in order: what :func:`load_flat` gives, in
    pieces, so a view that accumulates (``stats``) holds one shard in memory, not the output.

    Everything that can be refused (rule, columns, the shards' checksums) is checked here, once,
    before the first shard is read; a row's mask does not depend on its shard (``random`` draws
    per example id and position).
    """
    manifest, rule_used, changed, extra = _prepare(out, columns, rule)
    files = _shard_files(out, manifest)
    check_shards(out, manifest)
    if changed:
        end_of_turn_ids_of(manifest, rule_used)
    wanted = _wanted_columns(files[0], [*CORE_COLUMNS, *extra])
    return _iter_shards(out, files, wanted, manifest, rule_used, changed, extra)


def _iter_shards(
    out: str | Path,
    files: Sequence[Path],
    wanted: Sequence[str],
    manifest: dict[str, Any],
    rule: MaskRule,
    changed: bool,
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
        flat = _flat_of(table, manifest, rule, changed, extra)
        del table  # held here, the previous shard would live on while the next one is read
        yield flat
        del flat


def _flat_of(
    table: pa.Table,
    manifest: dict[str, Any],
    rule_used: MaskRule,
    changed: bool,
    extra: Sequence[str],
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
    end_of_turn = end_of_turn_tokens(input_ids, response, end_ids)
    if changed:
        keep = apply_rule(rule_used, logprobs, response, lengths=np.diff(offsets),
                          example_ids=example_ids, end_of_turn=end_of_turn)
    else:
        keep = stored_keep
    top1 = flat_list(table.column(TOP1_COLUMN))[0] if TOP1_COLUMN in table.column_names else None
    return Flat(
        manifest=manifest,
        rule=rule_used,
        rethresholded=changed,
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
        end_of_turn=end_of_turn,
        signals={c: flat_list(table.column(c))[0] for c in extra},
    )


def load_output_tokenizer(out: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer recorded in the manifest (``tokenizer.path``), or ``override``."""
    from profit_prep.rendering.renderer import load_tokenizer

    path = override or read_manifest(out).get("tokenizer", {}).get("path")
    if not path:
        raise InputError(f"{out}: the manifest names no tokenizer; pass --tokenizer")
    if override is None and not Path(str(path)).exists():
        raise InputError(
            f"tokenizer {visible(str(path))} (from the manifest) is absent here; pass --tokenizer"
        )
    return load_tokenizer(path)


def rule_keep(flat: Flat, rule: Rule) -> np.ndarray:
    """The response tokens a rule keeps, over every token of ``flat``.

    ProFit rules recompute from ``logprobs`` like the loader; selection rules go through
    :func:`profit_prep.rules.selection.apply`, a global ``top`` with its exact threshold over the
    output.
    """
    if rule is None:
        stored = flat.stored_keep if flat.stored_keep is not None else flat.keep
        return flat.response & stored
    if isinstance(rule, MaskRule):
        end_of_turn_ids_of(flat.manifest, rule)  # a clear error when it cannot protect
        return apply_rule(rule, flat.logprobs, flat.response, lengths=flat.lengths,
                          example_ids=flat.example_ids, end_of_turn=flat.end_of_turn)
    if rule.signal == "excess_loss":
        raise InputError("signal excess_loss needs a reference output; load(reference=...) has it")
    stored = None if rule.signal in (PROB, "loss") else flat.column(rule.column() or rule.signal)
    values = rules.signal_values(rule, flat.logprobs, stored)
    threshold = None
    if rule.kind == "top" and rule.scope == "global":
        threshold = rules.global_threshold(
            values[flat.response], rule.fraction or 0.0, rule.largest
        )
    return rules.apply(rule, values, flat.response, flat.lengths, threshold)


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


