"""ProFit token-selection rules: which response tokens stay in the loss.

``loss_mask = response_mask & rule(p)`` with ``p = exp(logprobs)``:

==========  =========================================================
``higher``  keep p >= tau (the paper's rule; tau = 0.1)
``lower``   keep p < tau (ablation)
``middle``  keep tau_low <= p <= tau_high (ablation)
``random``  keep a seeded random fraction ``keep_fraction`` (ablation)
==========  =========================================================

``protect="end_of_turn"`` (the default) keeps every assistant turn's end-of-turn token (the
template's ``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...) in the loss whatever its probability:
an offline reference rarely expects a dataset's answers to end where they do, and a model trained
without those tokens is never taught to stop. ``protect="none"`` is the paper's rule exactly
(docs/methods.md).

Everything works on flat arrays (all tokens of many examples end to end, with row offsets) so the
loader can re-threshold millions of tokens per second. The ``random`` rule draws from a hash of
(seed, example_id, position), so it does not depend on batching, ordering or worker count.

Example:
    >>> import numpy as np
    >>> rule = MaskRule("higher", tau=0.1)
    >>> lp = np.log(np.array([np.nan, 0.5, 0.05, 0.2], dtype=np.float32))
    >>> loss_mask(lp, np.array([False, True, True, True]), rule).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from profit_prep.errors import InputError

STRATEGIES = ("higher", "lower", "middle", "random")
PROTECT = ("end_of_turn", "none")


@dataclass(frozen=True)
class MaskRule:
    """A token-selection rule and its parameters."""

    strategy: str = "higher"
    tau: float = 0.1
    tau_low: float | None = None
    tau_high: float | None = None
    keep_fraction: float = 0.5
    seed: int = 0
    protect: str = "end_of_turn"

    def __post_init__(self) -> None:
        if self.protect not in PROTECT:
            raise InputError(f"unknown protect {self.protect!r} (choose {' or '.join(PROTECT)})")
        if self.strategy not in STRATEGIES:
            raise InputError(
                f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})"
            )
        if self.strategy in ("higher", "lower") and not 0.0 <= self.tau <= 1.0:
            raise InputError(f"tau must be a probability in [0, 1], got {self.tau}")
        if self.strategy == "middle":
            if self.tau_low is None or self.tau_high is None:
                raise InputError("strategy middle needs tau_low and tau_high (CLI: --tau-low/high)")
            if not 0.0 <= self.tau_low <= self.tau_high <= 1.0:
                raise InputError("strategy middle needs 0 <= tau_low <= tau_high <= 1")
        if self.strategy == "random" and not 0.0 <= self.keep_fraction <= 1.0:
            raise InputError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")

    def to_dict(self) -> dict[str, object]:
        """Only the parameters the strategy uses, for the manifest."""
        used = {
            "higher": ("tau",),
            "lower": ("tau",),
            "middle": ("tau_low", "tau_high"),
            "random": ("keep_fraction", "seed"),
        }[self.strategy]
        d = asdict(self)
        # "none" is left out: outputs written before protection existed read back as what they
        # are, the paper's rule.
        protect = {} if self.protect == "none" else {"protect": self.protect}
        return {"strategy": self.strategy, **{k: d[k] for k in used}, **protect}

    @classmethod
    def from_dict(cls, stored: dict[str, Any] | None) -> MaskRule:
        """The rule a manifest (or ``to_dict``) describes; no ``protect`` key means ``none``."""
        stored = dict(stored or {})
        unknown = sorted(set(stored) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"the manifest's mask is malformed (unknown keys {unknown}); "
                             "rescore the output")
        try:
            return cls(**{"protect": "none", **stored})
        except TypeError as exc:  # a hand-edited manifest: values of the wrong type
            raise InputError(
                f"the manifest's mask is malformed ({exc}); rescore the output"
            ) from None


def resolve_rule(stored: dict[str, Any] | None, **overrides: Any) -> MaskRule:
    """The one place a stored rule meets a caller's parameters (load, inspect, stats, report).

    Every parameter the caller gives (not None) replaces the stored one; every other parameter
    keeps its stored value, also when the strategy changes: ``lower`` on an output scored with
    ``higher, tau=0.3`` masks at tau 0.3 (the complement of the stored mask), and the stored
    ``protect`` stays unless given (docs/format.md).

    >>> resolve_rule({"strategy": "higher", "tau": 0.3}, strategy="lower").tau
    0.3
    """
    rule = MaskRule.from_dict(stored)
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - set(MaskRule.__dataclass_fields__))
    if unknown:
        raise TypeError(f"resolve_rule got unknown parameters {unknown}")
    return replace(rule, **changes) if changes else rule


def end_of_turn_tokens(
    input_ids: np.ndarray, response_mask: np.ndarray, end_of_turn_ids: Sequence[int]
) -> np.ndarray:
    """True on response tokens that are an end-of-turn token of the template (flat or per row).

    Special-token text inside a message is tokenized as text (profit_prep.rendering.renderer), so a
    response token with one of these ids is always the template's own turn end.
    """
    ids = np.asarray(input_ids)
    return np.asarray(response_mask, dtype=bool) & np.isin(ids, np.asarray(end_of_turn_ids,
                                                                           dtype=ids.dtype))


def example_key(example_id: str, seed: int) -> np.uint64:
    """A stable 64-bit key per example (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x00{example_id}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _uniform(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (key + position)."""
    with np.errstate(over="ignore"):
        z = keys + positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def keep_flat(
    logprobs: np.ndarray,
    rule: MaskRule,
    *,
    lengths: np.ndarray | None = None,
    example_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """The rule's keep decision for every token of a flat array (response mask not applied).

    ``lengths`` and ``example_ids`` are only needed by ``random``.
    """
    if rule.strategy == "random":
        if lengths is None or example_ids is None:
            raise ValueError("strategy random needs lengths and example_ids")
        lengths = np.asarray(lengths, dtype=np.int64)
        keys = np.array([example_key(e, rule.seed) for e in example_ids], dtype=np.uint64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.arange(int(lengths.sum()), dtype=np.int64) - starts
        return _uniform(np.repeat(keys, lengths), positions) < rule.keep_fraction
    p = np.exp(logprobs)  # NaN (position 0) compares False: never kept
    if rule.strategy == "higher":
        return p >= rule.tau
    if rule.strategy == "lower":
        return p < rule.tau
    return (p >= rule.tau_low) & (p <= rule.tau_high)


def end_of_turn_ids_of(manifest: dict[str, Any], rule: MaskRule) -> list[int] | None:
    """The ids ``rule`` protects in an output with this manifest (None when it protects none)."""
    if rule.protect == "none":
        return None
    ids = (manifest.get("render") or {}).get("end_of_turn_ids")
    if ids is None:
        raise InputError("this output predates end-of-turn protection (its manifest lists no "
                         "end_of_turn_ids): rescore it, or use protect none")
    return [int(i) for i in ids]


def apply_rule(
    rule: MaskRule,
    logprobs: np.ndarray,
    response: np.ndarray,
    *,
    lengths: np.ndarray,
    example_ids: Sequence[str] | None = None,
    end_of_turn: np.ndarray | None = None,
) -> np.ndarray:
    """The loss mask a rule gives over a flat array of many examples: what the loader and every
    view re-threshold with (``end_of_turn``: :func:`end_of_turn_tokens`, kept when protected)."""
    ids = example_ids if rule.strategy == "random" else None
    keep = np.asarray(response, dtype=bool) & keep_flat(logprobs, rule, lengths=lengths,
                                                        example_ids=ids)
    if end_of_turn is not None and rule.protect != "none":
        keep |= np.asarray(response, dtype=bool) & end_of_turn
    return keep


def loss_mask(
    logprobs: np.ndarray,
    response_mask: np.ndarray,
    rule: MaskRule,
    example_id: str = "",
    protected: np.ndarray | None = None,
) -> np.ndarray:
    """The loss mask of one example: response tokens the rule keeps, plus ``protected`` ones
    (the end-of-turn tokens, when ``rule.protect`` asks for them): :func:`apply_rule` on one
    row."""
    return apply_rule(rule, logprobs, response_mask, lengths=np.array([len(logprobs)]),
                      example_ids=[example_id], end_of_turn=protected)
