"""Look at what a mask removes: a terminal view of examples and vectorised statistics.

Everything starts from :class:`Flat`: all tokens of an output end to end (Arrow ``ListArray``
flattened into numpy) plus row offsets, so statistics over millions of tokens are a few numpy
calls. Only the handful of examples actually printed are walked token by token.

Example:
    >>> flat = load_flat("demo-out")  # doctest: +SKIP
    >>> stats = compute_stats(flat, load_output_tokenizer("demo-out"))  # doctest: +SKIP
    >>> round(stats["masked_fraction"], 3)  # doctest: +SKIP
    0.093
    >>> for text in render_examples(flat, tok, limit=1, color=False):  # doctest: +SKIP
    ...     print(text)

Besides the mask, the view can colour response tokens by any stored numeric per-token column
(``color_by="entropy"``: five quantile buckets over the output) or compare two rules
(``compare=(parse_rule("stored"), parse_rule("top:signal=entropy,fraction=0.8"))``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profit_prep import rules
from profit_prep.errors import InputError
from profit_prep.masks import (
    STRATEGIES,
    MaskRule,
    apply_rule,
    end_of_turn_ids_of,
    end_of_turn_tokens,
)
from profit_prep.masks import resolve_rule as resolve_stored_rule
from profit_prep.output import check_shards, read_manifest
from profit_prep.rules import Select

SWEEP_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
QUANTILES = {
    "min": 0.0,
    "p10": 0.1,
    "p25": 0.25,
    "median": 0.5,
    "p75": 0.75,
    "p90": 0.9,
    "max": 1.0,
}
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


def _flat_values(column: pa.ChunkedArray) -> np.ndarray:
    """The values of a list column, end to end (respects slicing, no Python loop)."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False)


def read_table(out: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """All shards of a finished output as one Arrow table (``top1_id`` added when present)."""
    manifest = read_manifest(out)
    files = [Path(out) / s["file"] for s in manifest["shards"]]
    if not files:
        raise InputError(f"{out}: the output holds no shards")
    # A shard copied over another, truncated or missing is refused, never shown (twice).
    check_shards(out, manifest)
    names = set(pq.read_schema(files[0]).names)
    wanted = [c for c in (columns or CORE_COLUMNS) if c in names]
    if TOP1_COLUMN in names and TOP1_COLUMN not in wanted:
        wanted.append(TOP1_COLUMN)
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=wanted))
        except (pa.ArrowException, OSError) as exc:  # a damaged page behind a valid footer
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"{out}: damaged output: {f.relative_to(out)} cannot be read ({reason}); "
                f"`profit-prep verify {out}` lists every problem"
            ) from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:  # shards of different schemas
        raise InputError(f"{out}: damaged output: the shards' columns differ ({exc})") from None


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
    """The stored rule with the given parameters (see :func:`profit_prep.masks.resolve_rule`),
    and True when one was given.

    >>> rule, changed = resolve_rule({"mask": {"strategy": "higher", "tau": 0.1}}, tau=0.3)
    >>> rule.strategy, rule.tau, changed
    ('higher', 0.3, True)
    """
    rule = resolve_stored_rule(manifest.get("mask"), **overrides)
    return rule, any(v is not None for v in overrides.values())


def load_flat(out: str | Path, *, columns: Sequence[str] = (), **rule: Any) -> Flat:
    """Read an output into a :class:`Flat`; any rule parameter given (``strategy``, ``tau``,
    ``tau_low``, ``tau_high``, ``keep_fraction``, ``seed``, ``protect``) re-thresholds the mask.

    ``columns`` names extra per-token columns to read into ``Flat.signals`` (see
    :func:`numeric_columns`); ``prob`` and ``logprobs`` are always there.
    """
    unknown = sorted(set(rule) - set(RULE_PARAMETERS))
    if unknown:
        raise TypeError(f"load_flat got unknown rule parameters {unknown}")
    manifest = read_manifest(out)
    rule_used, changed = resolve_rule(manifest, **rule)
    extra = [c for c in dict.fromkeys(columns) if c not in (PROB, "logprobs")]
    check_columns(out, extra)
    table = read_table(out, [*CORE_COLUMNS, *extra])
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks())
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    np.cumsum(lengths.to_numpy(zero_copy_only=False), out=offsets[1:])
    example_ids = table.column("example_id").to_pylist()
    response = _flat_values(table.column("response_mask")).astype(bool)
    logprobs = _flat_values(table.column("logprobs")).astype(np.float32)
    stored_keep = _flat_values(table.column("loss_mask")).astype(bool)
    input_ids = _flat_values(table.column("input_ids")).astype(np.int32)
    end_ids = (manifest.get("render") or {}).get("end_of_turn_ids") or []
    end_of_turn = end_of_turn_tokens(input_ids, response, end_ids)
    if changed:
        end_of_turn_ids_of(manifest, rule_used)  # a clear error when it cannot protect
        keep = apply_rule(rule_used, logprobs, response, lengths=np.diff(offsets),
                          example_ids=example_ids, end_of_turn=end_of_turn)
    else:
        keep = stored_keep
    top1 = _flat_values(table.column(TOP1_COLUMN)) if TOP1_COLUMN in table.column_names else None
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
        signals={c: _flat_values(table.column(c)) for c in extra},
    )


def load_output_tokenizer(out: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer recorded in the manifest (``tokenizer.path``), or ``override``."""
    from profit_prep.rendering import load_tokenizer

    path = override or read_manifest(out).get("tokenizer", {}).get("path")
    if not path:
        raise InputError(f"{out}: the manifest names no tokenizer; pass --tokenizer")
    if override is None and not Path(str(path)).exists():
        raise InputError(
            f"tokenizer {visible(str(path))} (from the manifest) is absent here; pass --tokenizer"
        )
    return load_tokenizer(path)


def describe_rule(rule: MaskRule) -> str:
    """``higher tau=0.1`` style text.

    >>> describe_rule(MaskRule("middle", tau_low=0.1, tau_high=0.9))
    'middle tau_low=0.1 tau_high=0.9'
    """
    params = " ".join(f"{k}={v}" for k, v in rule.to_dict().items() if k != "strategy")
    return visible(f"{rule.strategy} {params}")  # parameters come from the manifest


# -- text from the data, shown safely -----------------------------------------------------------

# Characters that must never reach a terminal (or a page) raw from the data: C0 controls except
# line break and tab (ESC starts CSI/OSC sequences: screen clear, window title, OSC 52 clipboard),
# DEL, C1 controls (0x9b is an 8-bit CSI, 0x9d an 8-bit OSC), the Unicode bidi controls that
# reorder how text reads (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069), the line/paragraph
# separators U+2028/9, other invisible format controls that can hide text (U+206A-U+206F,
# U+FFF9-U+FFFB, the tag characters U+E0000-U+E007F), and lone surrogates (not encodable:
# printing one would fail).
CONTROL_CHARS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u206f"
    "\ufff9-\ufffb\U000e0000-\U000e007f\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    r"""``text`` with every control character shown as an escape: the one function every view
    (inspect, stats, the HTML report, error lines) passes data-derived text through, so that only
    the view's own colour codes reach the terminal. Line breaks and tabs are kept (layout).

    >>> visible("a\x1b[2Jb\x9b\u202ec\n")
    'a\\x1b[2Jb\\x9b\\u202ec\n'
    """
    return CONTROL_CHARS.sub(_escape, text)


def stats_json(stats: dict[str, Any]) -> str:
    r"""``stats`` as JSON for a terminal: readable UTF-8, but every control character escaped
    (``json.dumps`` escapes only U+0000-U+001F; DEL, C1 and bidi controls would stay raw).

    >>> stats_json({"token": "\x9b\u202e\x1b"})
    '{\n  "token": "\\u009b\\u202e\\u001b"\n}'
    """
    text = json.dumps(stats, indent=2, ensure_ascii=False)
    return CONTROL_CHARS.sub(_json_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON writes a character beyond the BMP as a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# -- token text ------------------------------------------------------------------------------


def token_strings(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> list[str]:
    """One display string per token, in order.

    Byte-level BPE splits some characters over several tokens; decoding those alone gives
    U+FFFD, so such a run is decoded together and its text shown on the first token.
    """
    ids = [int(i) for i in ids]
    pieces = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(i + 5, len(ids)) + 1):
                joined = tokenizer.decode(
                    ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
                if "\ufffd" not in joined:
                    pieces[i:j] = [joined] + [""] * (j - i - 1)
                    i = j - 1
                    break
        i += 1
    return pieces


# -- statistics ------------------------------------------------------------------------------


def _histogram(values: np.ndarray, bins: int) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def _top_tokens(ids: np.ndarray, top: int, tokenizer: Any | None) -> list[dict[str, Any]]:
    values, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((values, -counts))[:top]  # most frequent first, ties by id
    strings = token_strings(tokenizer, values[order]) if tokenizer is not None else None
    return [
        {
            "token_id": int(values[k]),
            "token": strings[n] if strings else None,
            "count": int(counts[k]),
        }
        for n, k in enumerate(order)
    ]


def compute_stats(
    flat: Flat,
    tokenizer: Any | None = None,
    *,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    bins: int = 20,
    top: int = 20,
) -> dict[str, Any]:
    """Token counts, a threshold sweep, histograms and the most masked/kept tokens.

    The sweep applies the paper's rule (``higher``: keep p >= tau) at each threshold, whatever
    rule the output was scored with. Probabilities that are NaN count as masked (never kept).
    """
    p = flat.probs
    resp = flat.response
    masked = flat.masked
    n_resp = int(resp.sum())
    p_resp = p[resp]
    finite = p_resp[np.isfinite(p_resp)]
    # Sorted once, every threshold is a binary search: masked = response tokens below tau.
    ordered = np.sort(np.where(np.isfinite(p_resp), p_resp, -1.0))
    sweep = []
    for tau in thresholds:
        below = int(np.searchsorted(ordered, tau, side="left"))
        sweep.append(
            {
                "tau": float(tau),
                "masked_tokens": below,
                "masked_fraction": below / n_resp if n_resp else 0.0,
            }
        )

    row_of_token = np.repeat(np.arange(flat.n_examples), flat.lengths)
    resp_per = np.bincount(row_of_token, weights=resp, minlength=flat.n_examples)
    masked_per = np.bincount(row_of_token, weights=masked, minlength=flat.n_examples)
    has_resp = resp_per > 0
    frac = masked_per[has_resp] / resp_per[has_resp]
    per_example: dict[str, Any] = {"examples_with_response": int(has_resp.sum())}
    if frac.size:
        per_example["mean"] = float(frac.mean())
        per_example["quantiles"] = {k: float(np.quantile(frac, q)) for k, q in QUANTILES.items()}
    else:
        per_example["mean"] = None
        per_example["quantiles"] = dict.fromkeys(QUANTILES)
    per_example["histogram"] = _histogram(frac, bins)

    n_masked = int(masked.sum())
    end = flat.end_of_turn if flat.end_of_turn is not None else np.zeros_like(resp)
    n_end, n_end_masked = int(end.sum()), int((end & masked).sum())
    return {
        "examples": flat.n_examples,
        "tokens": int(flat.input_ids.size),
        "response_tokens": n_resp,
        "kept_tokens": int(flat.keep.sum()),
        "masked_tokens": n_masked,
        "masked_fraction": n_masked / n_resp if n_resp else 0.0,
        "rule": flat.rule.to_dict(),
        "rule_source": "re-thresholded" if flat.rethresholded else "stored",
        "threshold_sweep": {"strategy": "higher", "points": sweep},
        "probability_histogram": _histogram(finite, bins),
        "top_masked": _top_tokens(flat.input_ids[masked], top, tokenizer),
        "top_kept": _top_tokens(flat.input_ids[flat.keep], top, tokenizer),
        "per_example_masked_fraction": per_example,
        "end_of_turn": {"tokens": n_end, "masked": n_end_masked,
                        "masked_fraction": n_end_masked / n_end if n_end else None},
    }


def _end_of_turn_line(stats: dict[str, Any]) -> str:
    end = stats.get("end_of_turn") or {}
    if not end.get("tokens"):
        return "end of turn (no end-of-turn tokens in the responses)"
    return (f"end of turn {end['masked']} of {end['tokens']} masked "
            f"({end['masked_fraction']:.1%}; the tokens that close each answer)")


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as text a person reads."""
    lines = [
        f"examples    {stats['examples']}",
        f"tokens      {stats['tokens']} total, {stats['response_tokens']} response, "
        f"{stats['kept_tokens']} kept",
        f"masked      {stats['masked_fraction']:.1%} of response tokens "
        f"({describe_rule(MaskRule.from_dict(stats['rule']))}, {stats['rule_source']})",
        _end_of_turn_line(stats),
        "",
        "threshold sweep (strategy higher: masked = response tokens with p < tau)",
    ]
    lines += [
        f"  tau {pt['tau']:<5g} masked {pt['masked_fraction']:6.1%}  ({pt['masked_tokens']})"
        for pt in stats["threshold_sweep"]["points"]
    ]
    hist = stats["probability_histogram"]
    peak = max(hist["counts"]) or 1
    lines += ["", "probability of response tokens"]
    for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"], strict=True):
        lines.append(f"  {lo:4.2f}-{hi:4.2f} {c:7d} {'#' * round(40 * c / peak)}")
    per = stats["per_example_masked_fraction"]
    if per["mean"] is not None:
        q = per["quantiles"]
        n = per["examples_with_response"]
        lines += [
            "",
            f"per-example masked fraction (over {n} examples)",
            "  " + "  ".join(f"{k} {v:.1%}" for k, v in q.items()) + f"  mean {per['mean']:.1%}",
        ]
    for key, title in (("top_masked", "most often masked"), ("top_kept", "most often kept")):
        lines += ["", title]
        lines += [f"  {t['count']:7d}  {_show(t['token'], t['token_id'])}" for t in stats[key]]
    return visible("\n".join(lines))  # token texts are repr()s already; this is the backstop


def _show(text: str | None, token_id: int) -> str:
    return f"{text!r} (id {token_id})" if text is not None else f"id {token_id}"


# -- colour scales and rule comparison --------------------------------------------------------

COLOR_BUCKETS = 5


@dataclass(frozen=True)
class Scale:
    """Quantile buckets of one per-token column over the response tokens of an output.

    ``edges`` are the distinct values among the quantiles 0, 0.2, ..., 1 of the column, so there
    are up to ``COLOR_BUCKETS`` buckets; bucket ``b`` holds ``edges[b] <= v < edges[b + 1]`` (the
    last one includes the maximum). A column with many ties (``rank``: most tokens are 1) gets
    fewer buckets rather than empty ones. Non-finite values are in bucket -1.

    >>> scale = Scale("x", np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    >>> scale.bucket(np.array([0.0, 0.99, 1.0, 4.5, 5.0, np.nan])).tolist()
    [0, 0, 1, 4, 4, -1]
    >>> Scale("rank", np.array([1.0, 3.0, 9.0])).shade(1)
    4
    """

    column: str
    edges: np.ndarray

    @property
    def n_buckets(self) -> int:
        return max(len(self.edges) - 1, 1)

    def bucket(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        b = np.searchsorted(self.edges[1:-1], values, side="right")
        return np.where(np.isfinite(values), b, -1)

    def shade(self, bucket: int) -> int:
        """The colour of a bucket, 0 (lowest) .. ``COLOR_BUCKETS - 1``: few buckets spread out."""
        if self.n_buckets == 1:
            return COLOR_BUCKETS // 2
        return round(bucket * (COLOR_BUCKETS - 1) / (self.n_buckets - 1))

    def ranges(self) -> list[str]:
        """One ``lo–hi`` text per bucket, for legends."""
        e = self.edges if len(self.edges) > 1 else np.repeat(self.edges, 2)
        return [f"{e[b]:.4g}–{e[b + 1]:.4g}" for b in range(len(e) - 1)]


def color_scale(flat: Flat, column: str) -> Scale:
    """The :class:`Scale` of ``column`` over every response token of ``flat`` (finite values)."""
    values = flat.column(column)[flat.response].astype(np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return Scale(column, np.array([np.nan, np.nan]))
    return Scale(column, np.unique(np.quantile(values, np.linspace(0, 1, COLOR_BUCKETS + 1))))


Rule = MaskRule | Select | None  # None: the stored loss_mask
RULE_KINDS = ("stored", *STRATEGIES, "top", "band")


def _parse_value(raw: str, kind: Any, where: str) -> Any:
    if typing.get_args(kind):  # float | None -> float
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        raise InputError(f"{where}: {raw!r} is not a {kind.__name__}") from None


def parse_rule(text: str, stored: dict[str, Any] | None = None) -> Rule:
    """A rule written ``NAME[:KEY=VALUE,...]``: the fields of :class:`MaskRule` or :class:`Select`.

    With ``stored`` (the manifest's ``mask``), a ProFit rule's unset keys keep the stored values
    (:func:`profit_prep.masks.resolve_rule`, as ``load`` and ``--tau`` do); without it they take
    the dataclass defaults.

    ``stored`` is the stored ``loss_mask``; ``higher``/``lower``/``middle``/``random`` a ProFit
    rule (keys ``tau``, ``tau_low``, ``tau_high``, ``keep_fraction``, ``seed``, as in ``--tau``);
    ``top``/``band`` a load-time selection rule (keys ``signal``, ``fraction``, ``scope``,
    ``largest``, ``lo``, ``hi``). Unset keys take the dataclass defaults; the dataclasses validate.

    >>> parse_rule("higher:tau=0.3").tau
    0.3
    >>> parse_rule("lower", stored={"strategy": "higher", "tau": 0.3}).tau
    0.3
    >>> parse_rule("top:signal=entropy,fraction=0.2,scope=global").scope
    'global'
    >>> parse_rule("stored") is None
    True
    """
    name, _, params = text.strip().partition(":")
    if name == "stored" and not params.strip():
        return None
    if name in STRATEGIES:
        cls: type = MaskRule
        values: dict[str, Any] = {"strategy": name}
    elif name in ("top", "band"):
        cls, values = Select, {"kind": name}
    else:
        raise InputError(f"rule {text!r}: start with one of {', '.join(RULE_KINDS)}")
    hints = typing.get_type_hints(cls)
    keys = [f.name for f in dataclasses.fields(cls) if f.name not in ("strategy", "kind")]
    for item in filter(None, (x.strip() for x in params.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in keys:
            raise InputError(f"rule {text!r}: expected KEY=VALUE with KEY in {', '.join(keys)}")
        values[key] = _parse_value(raw.strip(), hints[key], f"rule {text!r}, {key}")
    if cls is MaskRule and stored is not None:
        return resolve_stored_rule(stored, **values)
    return cls(**values)


def describe_any(rule: Rule) -> str:
    """Text for any :data:`Rule`: ``stored``, ``higher tau=0.1``, ``top signal=entropy ...``.

    >>> describe_any(Select("band", "rank", hi=3))
    'band signal=rank hi=3'
    """
    if rule is None:
        return "stored loss_mask"
    if isinstance(rule, MaskRule):
        return describe_rule(rule)
    used = (
        ("signal", "fraction", "scope", "largest") if rule.kind == "top" else ("signal", "lo", "hi")
    )
    d = rule.to_dict()
    return visible(rule.kind + "".join(
        f" {k}={d[k]:g}" if isinstance(d[k], float) else f" {k}={d[k]}"
        for k in used
        if d[k] is not None
    ))


def rule_columns(rule: Rule) -> list[str]:
    """The stored columns a rule reads besides the core ones (for ``load_flat(columns=...)``)."""
    column = rule.column() if isinstance(rule, Select) else None
    return [column] if column else []


def rule_keep(flat: Flat, rule: Rule) -> np.ndarray:
    """The response tokens a rule keeps, over every token of ``flat``.

    ProFit rules recompute from ``logprobs`` like the loader; selection rules go through
    :func:`profit_prep.rules.apply`, a global ``top`` with its exact threshold over the output.
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
    if rule.signal in (PROB, "loss"):
        lp = flat.logprobs.astype(np.float64)
        values = np.exp(lp) if rule.signal == PROB else -lp
    else:
        values = flat.column(rule.column() or rule.signal).astype(np.float64)
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


# -- terminal view ---------------------------------------------------------------------------

RESET = "\x1b[0m"
PROMPT_STYLE = "\x1b[90m"  # grey
MASKED_STYLE = "\x1b[9;1;38;5;196;48;5;52m"  # struck, bold red on dark red
TOP1_STYLE = "\x1b[2;3m"  # dim italic
# Kept response tokens: red (unlikely) .. green (likely), 256-colour foregrounds.
PROB_STEPS = ((0.05, 196), (0.1, 202), (0.2, 208), (0.4, 214), (0.6, 220), (0.8, 148), (1.01, 40))


def _prob_style(p: float) -> str:
    for upper, code in PROB_STEPS:
        if p < upper:
            return f"\x1b[38;5;{code}m"
    return f"\x1b[38;5;{PROB_STEPS[-1][1]}m"  # NaN


def example_stats(flat: Flat, i: int) -> dict[str, Any]:
    """Counts of one example under the mask in use."""
    s = flat.row(i)
    n_resp = int(flat.response[s].sum())
    n_kept = int(flat.keep[s].sum())
    return {
        "tokens": s.stop - s.start,
        "response": n_resp,
        "kept": n_kept,
        "masked": n_resp - n_kept,
        "masked_fraction": (n_resp - n_kept) / n_resp if n_resp else 0.0,
    }


def example_header(flat: Flat, i: int) -> str:
    st = example_stats(flat, i)
    trunc = " · truncated" if flat.truncated[i] else ""
    return (
        f"example {visible(flat.example_ids[i])} (source row {int(flat.source_index[i])}) · "
        f"{st['tokens']} tokens · {st['response']} response · {st['kept']} kept · "
        f"{st['masked_fraction']:.1%} masked{trunc}"
    )


def example_tokens(
    flat: Flat, i: int, tokenizer: Any
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """One example's token texts, probabilities, response and masked flags, and the top-1 text
    of each masked token (when stored): what both the terminal view and the report draw.

    Texts are :func:`visible`: control characters in the data show as escapes (``\\x1b``)."""
    s = flat.row(i)
    pieces = [visible(p) for p in token_strings(tokenizer, flat.input_ids[s])]
    # Slice before computing: the whole-output properties would cost O(all tokens) per example.
    probs = np.exp(flat.logprobs[s].astype(np.float64))
    resp = flat.response[s]
    masked = resp & ~flat.keep[s]
    top1 = None
    if flat.top1 is not None:
        top1 = [visible(t) for t in token_strings(tokenizer, flat.top1[s][masked])]
    return pieces, probs, resp, masked, top1


# Quantile buckets, lowest first: blue .. yellow (256-colour foregrounds).
SCALE_CODES = (63, 33, 37, 114, 220)
STRIKE = "\x1b[9m"
COMPARE_STYLES = {
    BOTH: "\x1b[38;5;40m",  # green: kept either way
    A_ONLY: "\x1b[1;38;5;33m",  # bold blue
    B_ONLY: "\x1b[1;38;5;208m",  # bold orange
    NEITHER: MASKED_STYLE,
}
COMPARE_PLAIN = {A_ONLY: "{A:", B_ONLY: "{B:", NEITHER: "["}
CLOSE_PLAIN = {A_ONLY: "}", B_ONLY: "}", NEITHER: "]"}


def _scale_style(scale: Scale, bucket: int, struck: bool = False) -> str:
    """ANSI style of a token in ``bucket`` of ``scale`` (-1: no value, uncoloured)."""
    colour = [f"38;5;{SCALE_CODES[scale.shade(bucket)]}"] if bucket >= 0 else []
    codes = (["9"] if struck else []) + colour
    return f"\x1b[{';'.join(codes)}m" if codes else ""


def _plain(text: str) -> tuple[str, str]:
    """(text with line breaks written ``\\n``, the breaks themselves): marked tokens stay on one
    line and the text still breaks where the token does."""
    return text.replace("\n", "\\n"), "\n" * text.count("\n")


def format_value(v: float) -> str:
    """A per-token value as the views print it: whole numbers (``rank``) exactly, others to 4
    significant digits, ``nan`` when missing.

    >>> format_value(46722.0), format_value(-2.0937), format_value(float("nan"))
    ('46722', '-2.094', 'nan')
    """
    if not np.isfinite(v):
        return "nan"
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def render_example(
    flat: Flat,
    i: int,
    tokenizer: Any,
    *,
    color: bool,
    scale: Scale | None = None,
    comparison: Comparison | None = None,
) -> str:
    """One example as terminal text.

    Default (no ``scale``, no ``comparison``), without colour: prompt and kept tokens as plain
    text, each masked token as ``[text]`` with newlines inside shown as ``\\n`` (the line break
    itself follows the bracket); with a ``top1_id`` column, ``[text|top-1 text]``. With colour:
    prompt grey, response tokens coloured red..green by probability, masked tokens struck
    through in red.

    ``scale``: response tokens coloured by the quantile bucket of ``scale.column`` (masked ones
    also struck through); plain, every response token is followed by its value, ``text{0.693}``.

    ``comparison``: response tokens kept by both rules plain (green), kept by A only
    ``{A:text}`` (blue), by B only ``{B:text}`` (orange), by neither ``[text]`` (struck red).
    """
    pieces, probs, resp, masked, top1 = example_tokens(flat, i, tokenizer)
    s = flat.row(i)
    category = comparison.category[s] if comparison is not None else None
    values = flat.column(scale.column)[s] if scale is not None else None
    buckets = scale.bucket(values) if scale is not None else None
    out: list[str] = []
    k = 0
    for j, (text, p, r, m) in enumerate(zip(pieces, probs, resp, masked, strict=True)):
        alt = None
        if m:
            alt = top1[k] if top1 is not None else None
            k += 1
        if not r:
            out.append(f"{PROMPT_STYLE}{text}{RESET}" if color else text)
        elif category is not None:
            c = int(category[j])
            if c == BOTH:
                out.append(f"{COMPARE_STYLES[c]}{text}{RESET}" if color else text)
            elif color:
                shown = text.replace("\n", "↵") or "∅"
                out.append(f"{COMPARE_STYLES[c]}{shown}{RESET}{chr(10) * text.count(chr(10))}")
            else:
                body, breaks = _plain(text)
                out.append(f"{COMPARE_PLAIN[c]}{body}{CLOSE_PLAIN[c]}{breaks}")
        elif buckets is not None and values is not None:
            if color:
                shown = (text.replace("\n", "↵") or "∅") if m else text
                extra = f"{TOP1_STYLE}({alt}){RESET}" if alt is not None else ""
                breaks = "\n" * text.count("\n") if m else ""
                out.append(
                    f"{_scale_style(scale, int(buckets[j]), bool(m))}{shown}{RESET}{extra}{breaks}"
                )
            else:
                body, breaks = _plain(text)
                if m:
                    body = f"[{body}|{_plain(alt)[0]}]" if alt is not None else f"[{body}]"
                out.append(f"{body}{{{format_value(float(values[j]))}}}{breaks}")
        elif m:
            if color:
                shown = text.replace("\n", "↵") or "∅"
                extra = f"{TOP1_STYLE}({alt}){RESET}" if alt is not None else ""
                out.append(f"{MASKED_STYLE}{shown}{RESET}{extra}{chr(10) * text.count(chr(10))}")
            else:
                body, breaks = _plain(text)
                alt_text = f"|{_plain(alt)[0]}" if alt is not None else ""
                out.append(f"[{body}{alt_text}]{breaks}")
        else:
            out.append(f"{_prob_style(float(p))}{text}{RESET}" if color else text)
    return "".join(out)


def select_examples(
    flat: Flat,
    tokenizer: Any,
    *,
    row: str | None = None,
    grep: str | None = None,
    limit: int | None = 5,
) -> list[int]:
    """Indices of the examples to show: one id, those whose text contains ``grep``, or the first.

    ``grep`` is case-insensitive and matches the decoded conversation text.
    """
    if row is not None:
        for ids in (flat.example_ids, [visible(e) for e in flat.example_ids]):
            if row in ids:  # the raw id, or the id as the views print it (escapes)
                return [ids.index(row)]
        raise InputError(f"no example with id {row!r} in this output")
    picked: list[int] = []
    pattern = re.compile(re.escape(grep), re.IGNORECASE) if grep else None
    for i in range(flat.n_examples):
        if limit is not None and len(picked) >= limit:
            break
        if pattern is not None:
            text = tokenizer.decode(flat.input_ids[flat.row(i)], skip_special_tokens=False)
            if not pattern.search(text):
                continue
        picked.append(i)
    return picked


def _legend(
    flat: Flat, color: bool, scale: Scale | None, comparison: Comparison | None
) -> Iterator[str]:
    how = "re-thresholded" if flat.rethresholded else "stored"
    mask = f"mask: {describe_rule(flat.rule)} ({how})"
    if comparison is not None:
        a, b = describe_any(comparison.a), describe_any(comparison.b)
        if color:
            keys = " · ".join(
                f"{COMPARE_STYLES[c]}{name}{RESET}" for c, name in enumerate(CATEGORY_NAMES)
            )
            yield f"compare: A = {a} · B = {b} · {PROMPT_STYLE}prompt{RESET} · kept by {keys}"
        else:
            yield (
                f"compare: A = {a} · B = {b} · text = kept by both · {{A:text}} = kept by A "
                "only · {B:text} = kept by B only · [text] = kept by neither"
            )
        return
    if scale is None:
        if color:
            steps = " ".join(f"{_prob_style(u - 1e-9)}<{u:g}{RESET}" for u, _ in PROB_STEPS[:-1])
            yield (
                f"{mask} · {PROMPT_STYLE}prompt{RESET} · {MASKED_STYLE}masked{RESET} · "
                f"response p: {steps} {_prob_style(1.0)}high{RESET}"
            )
        else:
            yield f"{mask} · [token] = masked response token"
        return
    n = int(np.isfinite(flat.column(scale.column)[flat.response].astype(np.float64)).sum())
    column = visible(scale.column)  # a column name of the Parquet files
    if color:
        yield f"{mask} · {PROMPT_STYLE}prompt{RESET} · {STRIKE}masked{RESET} (struck through)"
        shades = " ".join(
            f"{_scale_style(scale, b)}■ {r}{RESET}" for b, r in enumerate(scale.ranges())
        )
    else:
        yield f"{mask} · [token] = masked response token · token{{v}} = its {column}"
        shades = " · ".join(f"q{b} {r}" for b, r in enumerate(scale.ranges()))
    yield f"{column} by quantile over {n} response tokens: {shades}"


def render_examples(
    flat: Flat,
    tokenizer: Any,
    *,
    row: str | None = None,
    grep: str | None = None,
    limit: int | None = 5,
    color: bool = False,
    color_by: str = PROB,
    compare: tuple[Rule, Rule] | None = None,
) -> Iterator[str]:
    """The terminal view, one block of text at a time (a legend, then one block per example).

    ``color_by``: ``prob`` (masked vs kept, coloured by probability) or a per-token column read
    into ``flat`` (:func:`color_scale`). ``compare``: two rules (:func:`parse_rule`) whose kept
    tokens are contrasted, with per-example counts in each header.
    """
    if compare is not None and color_by != PROB:
        raise InputError("--color-by and --compare both decide token colours; choose one")
    scale = color_scale(flat, color_by) if color_by != PROB else None
    comparison = compare_rules(flat, *compare) if compare is not None else None
    picked = select_examples(flat, tokenizer, row=row, grep=grep, limit=limit)
    yield "\n".join(_legend(flat, color, scale, comparison))
    for i in picked:
        bar = "─" * 3
        if comparison is None:
            head = example_header(flat, i)
        else:
            s = flat.row(i)
            counts = " · ".join(f"{k} {v}" for k, v in comparison.counts(s).items())
            trunc = " · truncated" if flat.truncated[i] else ""
            head = (
                f"example {visible(flat.example_ids[i])} (source row "
                f"{int(flat.source_index[i])}) · "
                f"{s.stop - s.start} tokens · {int(flat.response[s].sum())} response · "
                f"{counts}{trunc}"
            )
        yield f"\n{bar} {head} {bar}" if not color else f"\n\x1b[1m{bar} {head} {bar}{RESET}"
        yield render_example(flat, i, tokenizer, color=color, scale=scale, comparison=comparison)
    if not picked:
        yield "no matching examples"
    else:
        yield f"\n({len(picked)} of {flat.n_examples} examples shown)"
    if comparison is not None:
        total = " · ".join(f"{k} {v}" for k, v in comparison.counts().items())
        yield f"all {flat.n_examples} examples, response tokens kept by: {total}"
