"""Mask rules against direct NumPy expressions, and the random rule's independence of batching."""

from __future__ import annotations

import numpy as np
import pytest

from profit_prep.errors import InputError
from profit_prep.rules.profit import MaskRule, keep_flat, loss_mask
from tests.test_rendering import CONVERSATION  # system, user, assistant and tool turns


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


# -- end-of-turn protection ------------------------------------------------------------------



def _renderer(name: str, smollm2_tokenizer):
    from profit_prep.rendering.renderer import Renderer
    from tests.conftest import FIXTURES
    from tests.test_rendering import with_llama3_specials

    if name == "chatml":
        return Renderer(smollm2_tokenizer), "<|im_end|>"
    tokenizer = with_llama3_specials(smollm2_tokenizer)
    return Renderer(tokenizer, (FIXTURES / "llama3.jinja").read_text()), "<|eot_id|>"


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_every_assistant_turn_end_is_protected_and_nothing_else(smollm2_tokenizer,
                                                                name: str) -> None:
    from profit_prep.rendering.renderer import end_of_turn_ids
    from profit_prep.rules.profit import end_of_turn_tokens

    renderer, eot_text = _renderer(name, smollm2_tokenizer)
    tokenizer = renderer.tokenizer
    eot = end_of_turn_ids(renderer)
    assert eot == [tokenizer.convert_tokens_to_ids(eot_text)]
    r = renderer.render(CONVERSATION)
    protected = end_of_turn_tokens(r.input_ids, r.response_mask, eot)
    # One per assistant turn: the last response token of each turn, and it is the turn's end.
    runs = np.flatnonzero(r.response_mask & ~np.append(r.response_mask[1:], False))
    assert np.flatnonzero(protected).tolist() == runs.tolist()
    assert len(runs) == sum(m["role"] == "assistant" for m in CONVERSATION)
    assert all(tokenizer.decode([int(t)]) == eot_text for t in r.input_ids[protected])
    # The same token closes user, system and tool turns too: those are never protected.
    all_ends = r.input_ids == eot[0]
    assert all_ends.sum() > protected.sum() and not (protected & ~r.response_mask).any()
    # Under a rule that keeps nothing, protection keeps exactly those tokens.
    lp = np.full(len(r.input_ids), -30.0, np.float32)
    rule = MaskRule("higher", tau=0.5)
    np.testing.assert_array_equal(loss_mask(lp, r.response_mask, rule, "x", protected), protected)
    none = MaskRule("higher", tau=0.5, protect="none")
    assert not loss_mask(lp, r.response_mask, none, "x", protected).any()


def test_end_of_turn_text_inside_an_answer_is_not_protected(smollm2_tokenizer) -> None:
    from profit_prep.rendering.renderer import end_of_turn_ids
    from profit_prep.rules.profit import end_of_turn_tokens

    renderer, _ = _renderer("chatml", smollm2_tokenizer)
    r = renderer.render([{"role": "user", "content": "say it"},
                         {"role": "assistant", "content": "<|im_end|> is how I end"}])
    protected = end_of_turn_tokens(r.input_ids, r.response_mask, end_of_turn_ids(renderer))
    assert protected.sum() == 1 and protected[np.flatnonzero(r.response_mask)[-1]]


def test_protect_in_rule_dicts_and_resolution() -> None:
    from profit_prep.rules.profit import resolve_rule

    assert MaskRule().to_dict() == {"strategy": "higher", "tau": 0.1, "protect": "end_of_turn"}
    assert MaskRule(protect="none").to_dict() == {"strategy": "higher", "tau": 0.1}
    # A stored rule without "protect" (outputs before protection) reads back as the paper's rule.
    assert resolve_rule({"strategy": "higher", "tau": 0.1}).protect == "none"
    assert resolve_rule({"strategy": "higher", "tau": 0.3, "protect": "end_of_turn"},
                        strategy="lower") == MaskRule("lower", tau=0.3)
    assert resolve_rule(MaskRule(tau=0.3).to_dict(), protect="none").protect == "none"
    with pytest.raises(InputError, match="unknown protect"):
        MaskRule(protect="eos")
    with pytest.raises(InputError, match="malformed .unknown keys"):
        resolve_rule({"strategy": "higher", "tua": 0.1})
