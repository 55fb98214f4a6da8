"""Statistics of an output's masks: counts, a threshold sweep, histograms, the most masked and
kept tokens, the end-of-turn share; as a dict (``stats --json``) or text.

Example:
    >>> stats = compute_stats(load_flat("demo-out"), tokenizer)  # doctest: +SKIP
    >>> stats = compute_stats(iter_flat("demo-out"), tokenizer)  # doctest: +SKIP

``iter_flat`` reads one shard at a time: memory does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from profit_prep.rules.profit import MaskRule
from profit_prep.views.flat import Flat
from profit_prep.views.text import describe_rule, token_strings, visible

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


# -- statistics ------------------------------------------------------------------------------


def _histogram(counts: np.ndarray, bins: int) -> dict[str, list[float]]:
    return {"edges": [round(float(e), 6) for e in _edges(bins)],
            "counts": [int(c) for c in counts]}


def _edges(bins: int) -> np.ndarray:
    return np.histogram_bin_edges(np.empty(0), bins=bins, range=(0.0, 1.0))


def _bin_counts(values: np.ndarray, bins: int) -> np.ndarray:
    # A fixed range bins each value on its own, so counts of parts add up to the whole's.
    return np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.int64)


def _add_counts(total: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``total`` plus the occurrences of each token id in ``ids`` (grown to the largest id)."""
    counts = np.bincount(ids, minlength=total.size)
    counts[: total.size] += total
    return counts


def _top_tokens(counts: np.ndarray, top: int, tokenizer: Any | None) -> list[dict[str, Any]]:
    values = np.flatnonzero(counts)
    counts = counts[values]
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


class StatsAccumulator:
    """:func:`compute_stats` in parts: :meth:`add` one :class:`Flat` at a time (a shard, from
    :func:`profit_prep.views.flat.iter_flat`), then :meth:`finish`; the result equals
    ``compute_stats`` of all of them read as one. It keeps counts, plus one float per example
    (the quantiles need every example's masked fraction), never the tokens.
    """

    def __init__(self, thresholds: Sequence[float] = SWEEP_THRESHOLDS, bins: int = 20) -> None:
        self.thresholds = tuple(thresholds)
        self.bins = bins
        self.rule: MaskRule | None = None
        self.rethresholded = False
        self.examples = self.tokens = self.response = self.kept = self.masked = 0
        self.end = self.end_masked = 0
        self.below = np.zeros(len(self.thresholds), dtype=np.int64)
        self.prob_counts = np.zeros(bins, dtype=np.int64)
        self.masked_ids = np.zeros(0, dtype=np.int64)
        self.kept_ids = np.zeros(0, dtype=np.int64)
        self.fractions: list[np.ndarray] = []

    def add(self, flat: Flat) -> None:
        if self.rule is None:
            self.rule, self.rethresholded = flat.rule, flat.rethresholded
        p = flat.probs
        resp = flat.response
        masked = flat.masked
        p_resp = p[resp]
        finite = np.isfinite(p_resp)
        # Sorted once, every threshold is a binary search: masked = response tokens below tau.
        ordered = np.sort(np.where(finite, p_resp, -1.0))
        self.below += np.searchsorted(ordered, self.thresholds, side="left")
        self.prob_counts += _bin_counts(p_resp[finite], self.bins)

        row_of_token = np.repeat(np.arange(flat.n_examples), flat.lengths)
        resp_per = np.bincount(row_of_token, weights=resp, minlength=flat.n_examples)
        masked_per = np.bincount(row_of_token, weights=masked, minlength=flat.n_examples)
        has_resp = resp_per > 0
        self.fractions.append(masked_per[has_resp] / resp_per[has_resp])

        self.examples += flat.n_examples
        self.tokens += int(flat.input_ids.size)
        self.response += int(resp.sum())
        self.kept += int(flat.keep.sum())
        self.masked += int(masked.sum())
        self.masked_ids = _add_counts(self.masked_ids, flat.input_ids[masked])
        self.kept_ids = _add_counts(self.kept_ids, flat.input_ids[flat.keep])
        if flat.end_of_turn is not None:
            self.end += int(flat.end_of_turn.sum())
            self.end_masked += int((flat.end_of_turn & masked).sum())

    def finish(self, tokenizer: Any | None = None, *, top: int = 20) -> dict[str, Any]:
        if self.rule is None:
            raise ValueError("no Flat was added")
        n_resp, n_masked = self.response, self.masked
        sweep = [
            {
                "tau": float(tau),
                "masked_tokens": int(below),
                "masked_fraction": int(below) / n_resp if n_resp else 0.0,
            }
            for tau, below in zip(self.thresholds, self.below, strict=True)
        ]
        # One array in example order: the same mean and quantiles as over a single Flat.
        frac = np.concatenate(self.fractions)
        per_example: dict[str, Any] = {"examples_with_response": int(frac.size)}
        if frac.size:
            per_example["mean"] = float(frac.mean())
            per_example["quantiles"] = {
                k: float(np.quantile(frac, q)) for k, q in QUANTILES.items()
            }
        else:
            per_example["mean"] = None
            per_example["quantiles"] = dict.fromkeys(QUANTILES)
        per_example["histogram"] = _histogram(_bin_counts(frac, self.bins), self.bins)
        n_end, n_end_masked = self.end, self.end_masked
        return {
            "examples": self.examples,
            "tokens": self.tokens,
            "response_tokens": n_resp,
            "kept_tokens": self.kept,
            "masked_tokens": n_masked,
            "masked_fraction": n_masked / n_resp if n_resp else 0.0,
            "rule": self.rule.to_dict(),
            "rule_source": "re-thresholded" if self.rethresholded else "stored",
            "threshold_sweep": {"strategy": "higher", "points": sweep},
            "probability_histogram": _histogram(self.prob_counts, self.bins),
            "top_masked": _top_tokens(self.masked_ids, top, tokenizer),
            "top_kept": _top_tokens(self.kept_ids, top, tokenizer),
            "per_example_masked_fraction": per_example,
            "end_of_turn": {"tokens": n_end, "masked": n_end_masked,
                            "masked_fraction": n_end_masked / n_end if n_end else None},
        }


def compute_stats(
    flat: Flat | Iterable[Flat],
    tokenizer: Any | None = None,
    *,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    bins: int = 20,
    top: int = 20,
) -> dict[str, Any]:
    """Token counts, a threshold sweep, histograms and the most masked/kept tokens, of one
    :class:`Flat` or of several as one (``iter_flat(out)``: one shard in memory at a time).

    The sweep applies the paper's rule (``higher``: keep p >= tau) at each threshold, whatever
    rule the output was scored with. Probabilities that are NaN count as masked (never kept).
    """
    acc = StatsAccumulator(thresholds, bins)
    for part in [flat] if isinstance(flat, Flat) else flat:
        acc.add(part)
        del part  # not held while the next part is read
    return acc.finish(tokenizer, top=top)


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


