"""Mask rules against direct NumPy expressions, and the random rule's independence of batching."""

from __future__ import annotations

import numpy as np
import pytest

from profit_prep.errors import InputError
from profit_prep.masks import MaskRule, keep_flat, loss_mask


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 300, size=50)
    lp = np.log(rng.uniform(1e-6, 1, size=lengths.sum())).astype(np.float32)
    lp[np.cumsum(lengths) - lengths] = np.nan  # position 0 of every example
    response = rng.uniform(size=lengths.sum()) < 0.6
    ids = [f"ex-{i}" for i in range(len(lengths))]
    return lengths, lp, response, ids


@pytest.mark.parametrize(
    ("rule", "expr"),
    [
        (MaskRule("higher", tau=0.1), lambda p: p >= 0.1),
        (MaskRule("higher", tau=0.35), lambda p: p >= 0.35),
        (MaskRule("lower", tau=0.1), lambda p: p < 0.1),
        (MaskRule("middle", tau_low=0.2, tau_high=0.6), lambda p: (p >= 0.2) & (p <= 0.6)),
    ],
)
def test_threshold_rules_equal_numpy(data, rule: MaskRule, expr) -> None:
    lengths, lp, response, ids = data
    got = response & keep_flat(lp, rule, lengths=lengths, example_ids=ids)
    assert np.array_equal(got, response & expr(np.exp(lp)))
    assert not got[np.isnan(lp)].any()  # position 0 is never kept


def test_random_rule_is_seeded_per_example_not_per_batch(data) -> None:
    lengths, lp, response, ids = data
    rule = MaskRule("random", keep_fraction=0.3, seed=7)
    whole = keep_flat(lp, rule, lengths=lengths, example_ids=ids)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    one_by_one = np.concatenate(
        [
            loss_mask(lp[a:b], np.ones(b - a, bool), rule, e)
            for a, b, e in zip(bounds, bounds[1:], ids)
        ]
    )
    assert np.array_equal(whole, one_by_one)
    assert abs(whole.mean() - 0.3) < 0.02
    other_seed = keep_flat(lp, MaskRule("random", keep_fraction=0.3, seed=8),
                           lengths=lengths, example_ids=ids)
    assert not np.array_equal(whole, other_seed)


def test_random_rule_same_example_same_mask_in_any_order(data) -> None:
    lengths, lp, _, ids = data
    rule = MaskRule("random", keep_fraction=0.5)
    forward = keep_flat(lp, rule, lengths=lengths, example_ids=ids)
    rev = keep_flat(lp, rule, lengths=lengths[::-1], example_ids=ids[::-1])
    first = forward[: lengths[0]]
    last_in_rev = rev[-lengths[0]:]
    assert np.array_equal(first, last_in_rev)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "best"}, "unknown strategy"),
        ({"tau": 1.5}, "tau must be a probability"),
        ({"strategy": "middle"}, "needs tau_low and tau_high"),
        ({"strategy": "middle", "tau_low": 0.6, "tau_high": 0.2}, "tau_low <= tau_high"),
        ({"strategy": "random", "keep_fraction": 2.0}, "keep_fraction"),
    ],
)
def test_bad_rules_are_refused(kwargs, message: str) -> None:
    with pytest.raises(InputError, match=message):
        MaskRule(**kwargs)
