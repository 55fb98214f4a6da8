"""Statistics of an output's masks: counts, a threshold sweep, histograms, the most masked and
kept tokens, the end-of-turn share; as a dict (``stats --json``) or text.

Example:
    >>> stats = compute_stats(load_flat("demo-out"), tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from profit_prep.masks import MaskRule
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


