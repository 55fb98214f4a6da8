"""Load-time token-selection rules beyond ProFit's probability threshold (docs/methods.md).

A :class:`Select` picks response tokens by one per-token *signal*:

================  ====================================================================
``prob``          ``exp(logprobs)`` (ProFit's signal)
``loss``          ``-logprobs``
``entropy``       stored ``entropy`` column (score with ``--signals entropy``)
``top1_logprob``  stored ``top1_logprob`` column (``--signals top1``)
``rank``          stored ``rank`` column (``--signals rank``)
``excess_loss``   ``loss - loss_reference`` (``load(..., reference=OTHER_OUT)``)
================  ====================================================================

Kinds:

* ``top``: keep the ``fraction`` of response tokens with the largest signal (``largest=False``:
  the smallest). ``scope="example"``: per row, exactly ``ceil(fraction * n_response)`` tokens
  (ties broken by position); ``scope="global"``: every response token whose signal reaches the
  exact k-th largest value over the whole dataset, ``k = ceil(fraction * N_response)`` (ties at
  the threshold are all kept).
* ``band``: keep ``lo <= signal <= hi`` (either bound may be None).

The loader ANDs the result with ``response_mask``; it replaces the stored ProFit mask.

Example:
    >>> rho1 = Select("top", "excess_loss", fraction=0.6)  # per example, like Rho-1
    >>> clean = Select("top", "excess_loss", fraction=0.6, scope="global")  # token cleaning
    >>> band = Select("band", "entropy", lo=0.5)  # high-entropy tokens only
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from profit_prep.errors import InputError

SIGNALS = ("prob", "loss", "entropy", "top1_logprob", "rank", "excess_loss")
STORED = {"entropy": "entropy", "top1_logprob": "top1_logprob", "rank": "rank"}


@dataclass(frozen=True)
class Select:
    """A load-time selection rule (see the module docstring)."""

    kind: str = "top"
    signal: str = "prob"
    fraction: float | None = None
    scope: str = "example"
    largest: bool = True
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("top", "band"):
            raise InputError(f"unknown selection kind {self.kind!r} (choose top or band)")
        if self.signal not in SIGNALS:
            raise InputError(f"unknown signal {self.signal!r} (choose from {', '.join(SIGNALS)})")
        if self.kind == "top":
            if self.fraction is None or not 0.0 <= self.fraction <= 1.0:
                raise InputError(f"top selection needs fraction in [0, 1], got {self.fraction}")
            if self.scope not in ("example", "global"):
                raise InputError(f"scope must be example or global, got {self.scope!r}")
        elif self.lo is None and self.hi is None:
            raise InputError("band selection needs lo and/or hi")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def column(self) -> str | None:
        """The stored signal column this rule reads (None: computed from logprobs/reference)."""
        return STORED.get(self.signal)


def keep_top_per_example(
    values: np.ndarray, resp: np.ndarray, lengths: np.ndarray, fraction: float, largest: bool = True
) -> np.ndarray:
    """Per row, the ``ceil(fraction * n_response)`` response tokens with the largest values.

    NaN counts as the smallest value; ties go to the earlier position.
    """
    n_rows = len(lengths)
    row = np.repeat(np.arange(n_rows), lengths)
    key = np.where(np.isnan(values), -np.inf, values.astype(np.float64))
    key = -key if largest else np.where(np.isnan(values), np.inf, values.astype(np.float64))
    candidates = np.flatnonzero(resp)
    order = candidates[np.lexsort((candidates, key[candidates], row[candidates]))]
    n_resp = np.bincount(row[candidates], minlength=n_rows)
    k = np.ceil(np.round(fraction * n_resp, 9)).astype(np.int64)
    first = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(n_resp, out=first[1:])
    position = np.arange(len(order)) - np.repeat(first[:-1], n_resp)
    keep = np.zeros(len(values), dtype=bool)
    keep[order[position < np.repeat(k, n_resp)]] = True
    return keep


def global_threshold(values: np.ndarray, fraction: float, largest: bool = True) -> float:
    """The exact k-th largest (smallest) of ``values``, ``k = ceil(fraction * len)``.

    Returns +inf (-inf) when nothing is to be kept.
    """
    values = values[~np.isnan(values)].astype(np.float64)
    k = int(np.ceil(round(fraction * len(values), 9)))
    if k == 0:
        return float("inf") if largest else float("-inf")
    if largest:
        return float(-np.partition(-values, k - 1)[k - 1])
    return float(np.partition(values, k - 1)[k - 1])


def apply(
    rule: Select,
    values: np.ndarray,
    resp: np.ndarray,
    lengths: np.ndarray,
    threshold: float | None = None,
) -> np.ndarray:
    """Keep mask over flat tokens (already ANDed with ``resp``)."""
    with np.errstate(invalid="ignore"):
        if rule.kind == "band":
            keep = np.ones(len(values), dtype=bool)
            if rule.lo is not None:
                keep &= values >= rule.lo
            if rule.hi is not None:
                keep &= values <= rule.hi
            return keep & resp
        if rule.scope == "example":
            return keep_top_per_example(values, resp, lengths, rule.fraction or 0.0, rule.largest)
        if threshold is None:
            raise ValueError("a global top rule needs its threshold")
        keep = values >= threshold if rule.largest else values <= threshold
        return keep & resp
