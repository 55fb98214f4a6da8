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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.masks import MaskRule, keep_flat
from profit_prep.output import read_manifest

SWEEP_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p90": 0.9,
             "max": 1.0}
CORE_COLUMNS = ("example_id", "source_index", "input_ids", "response_mask", "logprobs",
                "loss_mask", "truncated")
TOP1_COLUMN = "top1_id"  # optional future column: the reference model's most likely token


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
    names = set(pq.read_schema(files[0]).names)
    wanted = [c for c in (columns or CORE_COLUMNS) if c in names]
    if TOP1_COLUMN in names and TOP1_COLUMN not in wanted:
        wanted.append(TOP1_COLUMN)
    return pa.concat_tables([pq.read_table(f, columns=wanted) for f in files])


def resolve_rule(
    manifest: dict[str, Any],
    strategy: str | None = None,
    tau: float | None = None,
    tau_low: float | None = None,
    tau_high: float | None = None,
) -> tuple[MaskRule, bool]:
    """The stored rule, with any given parameter replaced; True when something was replaced.

    >>> rule, changed = resolve_rule({"mask": {"strategy": "higher", "tau": 0.1}}, tau=0.3)
    >>> rule.strategy, rule.tau, changed
    ('higher', 0.3, True)
    """
    stored = MaskRule(**manifest.get("mask", {}))
    changes = {k: v for k, v in (("strategy", strategy), ("tau", tau), ("tau_low", tau_low),
                                 ("tau_high", tau_high)) if v is not None}
    if not changes:
        return stored, False
    return dataclasses.replace(stored, **changes), True


def load_flat(
    out: str | Path,
    *,
    strategy: str | None = None,
    tau: float | None = None,
    tau_low: float | None = None,
    tau_high: float | None = None,
) -> Flat:
    """Read an output into a :class:`Flat`; any rule parameter given re-thresholds the mask."""
    manifest = read_manifest(out)
    rule, changed = resolve_rule(manifest, strategy, tau, tau_low, tau_high)
    table = read_table(out)
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks())
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    np.cumsum(lengths.to_numpy(zero_copy_only=False), out=offsets[1:])
    example_ids = table.column("example_id").to_pylist()
    response = _flat_values(table.column("response_mask")).astype(bool)
    logprobs = _flat_values(table.column("logprobs")).astype(np.float32)
    if changed:
        keep = response & keep_flat(logprobs, rule, lengths=np.diff(offsets),
                                    example_ids=example_ids)
    else:
        keep = _flat_values(table.column("loss_mask")).astype(bool)
    top1 = _flat_values(table.column(TOP1_COLUMN)) if TOP1_COLUMN in table.column_names else None
    return Flat(
        manifest=manifest,
        rule=rule,
        rethresholded=changed,
        example_ids=example_ids,
        source_index=table.column("source_index").to_numpy(),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        offsets=offsets,
        input_ids=_flat_values(table.column("input_ids")).astype(np.int32),
        response=response,
        logprobs=logprobs,
        keep=keep,
        top1=top1,
    )


def load_output_tokenizer(out: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer recorded in the manifest (``tokenizer.path``), or ``override``."""
    from profit_prep.rendering import load_tokenizer

    path = override or read_manifest(out).get("tokenizer", {}).get("path")
    if not path:
        raise InputError(f"{out}: the manifest names no tokenizer; pass --tokenizer")
    if override is None and not Path(path).exists():
        raise InputError(f"tokenizer {path} (from the manifest) is absent here; pass --tokenizer")
    return load_tokenizer(path)


def describe_rule(rule: MaskRule) -> str:
    """``higher tau=0.1`` style text.

    >>> describe_rule(MaskRule("middle", tau_low=0.1, tau_high=0.9))
    'middle tau_low=0.1 tau_high=0.9'
    """
    params = " ".join(f"{k}={v}" for k, v in rule.to_dict().items() if k != "strategy")
    return f"{rule.strategy} {params}"


# -- token text ------------------------------------------------------------------------------


def token_strings(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> list[str]:
    """One display string per token, in order.

    Byte-level BPE splits some characters over several tokens; decoding those alone gives
    U+FFFD, so such a run is decoded together and its text shown on the first token.
    """
    ids = [int(i) for i in ids]
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(i + 5, len(ids)) + 1):
                joined = tokenizer.decode(ids[i:j], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
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
        {"token_id": int(values[k]), "token": strings[n] if strings else None,
         "count": int(counts[k])}
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
        sweep.append({"tau": float(tau), "masked_tokens": below,
                      "masked_fraction": below / n_resp if n_resp else 0.0})

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
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as text a person reads."""
    lines = [
        f"examples    {stats['examples']}",
        f"tokens      {stats['tokens']} total, {stats['response_tokens']} response, "
        f"{stats['kept_tokens']} kept",
        f"masked      {stats['masked_fraction']:.1%} of response tokens "
        f"({describe_rule(MaskRule(**stats['rule']))}, {stats['rule_source']})",
        "",
        "threshold sweep (strategy higher: masked = response tokens with p < tau)",
    ]
    lines += [f"  tau {pt['tau']:<5g} masked {pt['masked_fraction']:6.1%}  ({pt['masked_tokens']})"
              for pt in stats["threshold_sweep"]["points"]]
    hist = stats["probability_histogram"]
    peak = max(hist["counts"]) or 1
    lines += ["", "probability of response tokens"]
    for lo, hi, c in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"], strict=True):
        lines.append(f"  {lo:4.2f}-{hi:4.2f} {c:7d} {'#' * round(40 * c / peak)}")
    per = stats["per_example_masked_fraction"]
    if per["mean"] is not None:
        q = per["quantiles"]
        n = per["examples_with_response"]
        lines += ["", f"per-example masked fraction (over {n} examples)",
                  "  " + "  ".join(f"{k} {v:.1%}" for k, v in q.items())
                  + f"  mean {per['mean']:.1%}"]
    for key, title in (("top_masked", "most often masked"), ("top_kept", "most often kept")):
        lines += ["", title]
        lines += [f"  {t['count']:7d}  {_show(t['token'], t['token_id'])}" for t in stats[key]]
    return "\n".join(lines)


def _show(text: str | None, token_id: int) -> str:
    return f"{text!r} (id {token_id})" if text is not None else f"id {token_id}"


# -- terminal view ---------------------------------------------------------------------------

RESET = "\x1b[0m"
PROMPT_STYLE = "\x1b[90m"  # grey
MASKED_STYLE = "\x1b[9;1;38;5;196;48;5;52m"  # struck, bold red on dark red
TOP1_STYLE = "\x1b[2;3m"  # dim italic
# Kept response tokens: red (unlikely) .. green (likely), 256-colour foregrounds.
PROB_STEPS = ((0.05, 196), (0.1, 202), (0.2, 208), (0.4, 214), (0.6, 220), (0.8, 148),
              (1.01, 40))


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
    return {"tokens": s.stop - s.start, "response": n_resp, "kept": n_kept,
            "masked": n_resp - n_kept,
            "masked_fraction": (n_resp - n_kept) / n_resp if n_resp else 0.0}


def example_header(flat: Flat, i: int) -> str:
    st = example_stats(flat, i)
    trunc = " · truncated" if flat.truncated[i] else ""
    return (f"example {flat.example_ids[i]} (source row {int(flat.source_index[i])}) · "
            f"{st['tokens']} tokens · {st['response']} response · {st['kept']} kept · "
            f"{st['masked_fraction']:.1%} masked{trunc}")


def example_tokens(
    flat: Flat, i: int, tokenizer: Any
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """One example's token texts, probabilities, response and masked flags, and the top-1 text
    of each masked token (when stored): what both the terminal view and the report draw."""
    s = flat.row(i)
    pieces = token_strings(tokenizer, flat.input_ids[s])
    # Slice before computing: the whole-output properties would cost O(all tokens) per example.
    probs = np.exp(flat.logprobs[s].astype(np.float64))
    resp = flat.response[s]
    masked = resp & ~flat.keep[s]
    top1 = token_strings(tokenizer, flat.top1[s][masked]) if flat.top1 is not None else None
    return pieces, probs, resp, masked, top1


def render_example(flat: Flat, i: int, tokenizer: Any, *, color: bool) -> str:
    """One example as terminal text.

    Without colour: prompt and kept tokens as plain text, each masked token as ``[text]`` with
    newlines inside shown as ``\\n`` (the line break itself follows the bracket); with a
    ``top1_id`` column, ``[text|top-1 text]``. With colour: prompt grey, response tokens coloured
    red..green by probability, masked tokens struck through in red.
    """
    pieces, probs, resp, masked, top1 = example_tokens(flat, i, tokenizer)
    out: list[str] = []
    k = 0
    for text, p, r, m in zip(pieces, probs, resp, masked, strict=True):
        if m:
            alt = top1[k] if top1 is not None else None
            k += 1
            breaks = "\n" * text.count("\n")
            if color:
                shown = text.replace("\n", "↵") or "∅"
                extra = f"{TOP1_STYLE}({alt}){RESET}" if alt is not None else ""
                out.append(f"{MASKED_STYLE}{shown}{RESET}{extra}{breaks}")
            else:
                alt_text = f"|{alt.replace(chr(10), chr(92) + 'n')}" if alt is not None else ""
                out.append(f"[{text.replace(chr(10), chr(92) + 'n')}{alt_text}]{breaks}")
        elif not color:
            out.append(text)
        elif r:
            out.append(f"{_prob_style(float(p))}{text}{RESET}")
        else:
            out.append(f"{PROMPT_STYLE}{text}{RESET}")
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
        try:
            return [flat.example_ids.index(row)]
        except ValueError:
            raise InputError(f"no example with id {row!r} in this output") from None
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


def render_examples(
    flat: Flat,
    tokenizer: Any,
    *,
    row: str | None = None,
    grep: str | None = None,
    limit: int | None = 5,
    color: bool = False,
) -> Iterator[str]:
    """The terminal view, one block of text at a time (a legend, then one block per example)."""
    picked = select_examples(flat, tokenizer, row=row, grep=grep, limit=limit)
    how = "re-thresholded" if flat.rethresholded else "stored"
    if color:
        scale = " ".join(f"{_prob_style(u - 1e-9)}<{u:g}{RESET}" for u, _ in PROB_STEPS[:-1])
        yield (f"mask: {describe_rule(flat.rule)} ({how}) · {PROMPT_STYLE}prompt{RESET} · "
               f"{MASKED_STYLE}masked{RESET} · response p: {scale} {_prob_style(1.0)}high{RESET}")
    else:
        yield (f"mask: {describe_rule(flat.rule)} ({how}) · [token] = masked response token")
    for i in picked:
        bar = "─" * 3
        head = example_header(flat, i)
        yield f"\n{bar} {head} {bar}" if not color else f"\n\x1b[1m{bar} {head} {bar}{RESET}"
        yield render_example(flat, i, tokenizer, color=color)
    if not picked:
        yield "no matching examples"
    else:
        yield f"\n({len(picked)} of {flat.n_examples} examples shown)"
