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

import dataclasses
import typing
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.rules.profit import STRATEGIES, MaskRule
from profit_prep.rules.profit import resolve_rule as resolve_stored_rule

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


def signal_values(
    rule: Select, logprobs: np.ndarray, stored: np.ndarray | None = None
) -> np.ndarray:
    """The rule's signal per flat token, float64: the one mapping the loader and every view use
    (so a top-k boundary falls on the same token everywhere).

    ``prob`` and ``loss`` come from ``logprobs``; every other signal is ``stored`` (the output's
    column, or the excess loss against a reference).
    """
    if rule.signal in ("prob", "loss"):
        lp = np.asarray(logprobs, dtype=np.float64)
        return np.exp(lp) if rule.signal == "prob" else -lp
    if stored is None:
        raise ValueError(f"signal {rule.signal!r} needs its stored values")
    return np.asarray(stored, dtype=np.float64)


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


# --------------------------------------------------------------------------- rules as text

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
    (:func:`profit_prep.rules.profit.resolve_rule`, as ``load`` and ``--tau`` do); without it they
    take
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


def rule_columns(rule: Rule) -> list[str]:
    """The stored columns a rule reads besides the core ones (for ``load_flat(columns=...)``)."""
    column = rule.column() if isinstance(rule, Select) else None
    return [column] if column else []
