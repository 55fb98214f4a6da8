"""ProFit token-selection rules: which response tokens stay in the loss.

``loss_mask = response_mask & rule(p)`` with ``p = exp(logprobs)``:

==========  =========================================================
``higher``  keep p >= tau (the paper's rule; tau = 0.1)
``lower``   keep p < tau (ablation)
``middle``  keep tau_low <= p <= tau_high (ablation)
``random``  keep a seeded random fraction ``keep_fraction`` (ablation)
==========  =========================================================

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
from dataclasses import asdict, dataclass

import numpy as np

from profit_prep.errors import InputError

STRATEGIES = ("higher", "lower", "middle", "random")


@dataclass(frozen=True)
class MaskRule:
    """A token-selection rule and its parameters."""

    strategy: str = "higher"
    tau: float = 0.1
    tau_low: float | None = None
    tau_high: float | None = None
    keep_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
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
        return {"strategy": self.strategy, **{k: d[k] for k in used}}


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


def loss_mask(
    logprobs: np.ndarray, response_mask: np.ndarray, rule: MaskRule, example_id: str = ""
) -> np.ndarray:
    """The loss mask of one example: response tokens the rule keeps."""
    keep = keep_flat(
        logprobs, rule, lengths=np.array([len(logprobs)]), example_ids=[example_id]
    )
    return np.asarray(response_mask, dtype=bool) & keep
