"""The rule layer: the rule parameters are declared once, and a rule keeps the same tokens in
every reader (load, inspect, stats, report, --compare)."""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import profit_prep

# The oracle: the seven rule parameters as the issue names them (not read from the package).
RULE_PARAMETERS = {"strategy", "tau", "tau_low", "tau_high", "keep_fraction", "seed", "protect"}
END = 7  # the synthetic template's end-of-turn id


def _names(node: ast.AST) -> set[str]:
    """The names a node declares or spells together: a class's fields, a function's
    parameters, a literal tuple/list/set of strings, a dict's keys, a call's keywords."""
    if isinstance(node, ast.ClassDef):
        return {s.target.id for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        a = node.args
        return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {e.value for e in node.elts if isinstance(e, ast.Constant)
                and isinstance(e.value, str)}
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant)
                and isinstance(k.value, str)}
    if isinstance(node, ast.Call):
        return {k.arg for k in node.keywords if k.arg}
    return set()


def rule_parameter_lists(root: Path) -> list[str]:
    """Every place in ``root``'s sources that spells three or more rule parameters together."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if len(_names(node) & RULE_PARAMETERS) >= 3:
                found.append(f"{path.relative_to(root)}:{node.lineno} {type(node).__name__}")
    return found


def test_rule_parameters_are_declared_in_exactly_one_place(tmp_path: Path) -> None:
    package = Path(profit_prep.__file__).parent
    found = rule_parameter_lists(package)
    assert len(found) == 1 and found[0].endswith("ClassDef"), found
    # The scan does see a second list: a copy of the parameters as keywords is caught.
    (tmp_path / "copy.py").write_text(
        "def load(path, *, strategy=None, tau=None, tau_low=None, tau_high=None):\n    pass\n")
    assert len(rule_parameter_lists(tmp_path)) == 1
    # And the one declaration is MaskRule's, which every reader, ScoreConfig and the CLI take.
    from dataclasses import fields

    assert {f.name for f in fields(profit_prep.MaskRule)} == RULE_PARAMETERS


# -- the same tokens in every reader -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_shard_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic output (two shards, many tied probabilities, end-of-turn tokens) whose
    stored mask is the stored rule's."""
    from profit_prep.rules.profit import MaskRule, end_of_turn_tokens, loss_mask
    from profit_prep.store.schema import ScoredExample, to_table
    from profit_prep.store.writer import OutputDir

    rng = np.random.default_rng(3)
    stored = MaskRule("higher", tau=0.2)
    shards: list[list[ScoredExample]] = [[], []]
    for i in range(12):
        n = int(rng.integers(20, 50))
        lp = np.log(rng.choice([0.03, 0.15, 0.2, 0.2, 0.45, 0.9], size=n)).astype(np.float32)
        lp[0] = np.nan
        ids = rng.integers(10, 99, n).astype(np.int32)
        resp = np.arange(n) >= int(rng.integers(3, 10))
        ids[-1] = END  # the turn's end, often improbable
        lp[-1] = np.log(0.01)
        keep = loss_mask(lp, resp, stored, str(i), end_of_turn_tokens(ids, resp, [END]))
        shards[i % 2].append(ScoredExample(str(i), i, ids, resp, lp, keep, False, n))
    out = OutputDir(tmp_path_factory.mktemp("keep") / "o")
    with out.open({"t": 1}):
        for k, examples in enumerate(shards):
            out.write_shard(k, to_table(examples), [])
        out.finalize({"mask": stored.to_dict(), "render": {"end_of_turn_ids": [END]}}, 2)
    return out.path


# (text as --compare and parse_rule take it, the same rule as CLI flags)
PROFIT_RULES = [
    ("random:keep_fraction=0.4,seed=7",
     ["--strategy", "random", "--keep-fraction", "0.4", "--rule-seed", "7"]),
    ("middle:tau_low=0.1,tau_high=0.5", ["--strategy", "middle", "--tau-low", "0.1",
                                        "--tau-high", "0.5"]),
    ("lower", ["--strategy", "lower"]),  # at the stored tau
    ("higher:tau=0.4,protect=none", ["--tau", "0.4", "--protect", "none"]),
]
SELECT_RULES = ["top:signal=prob,fraction=0.3,scope=global", "top:signal=loss,fraction=0.5",
                "band:signal=loss,lo=1.0,hi=3.0"]


def _loaded(out: Path, **kwargs: Any) -> np.ndarray:
    from profit_prep.training.loader import load

    return np.concatenate([np.array(m, bool) for m in load(out, **kwargs)["completion_mask"]])


def _report_masked(page: str) -> np.ndarray:
    """Per response token of the report (examples in order), True when shown masked."""
    examples = page.split('<div id="example-list">', 1)[1]  # not the legend's spans
    spans = re.findall(r'<span class="(tok[^"]*)"', examples)
    return np.array(["masked" in cls.split() for cls in spans], dtype=bool)


@pytest.mark.parametrize(("text", "flags"), PROFIT_RULES, ids=[t for t, _ in PROFIT_RULES])
def test_a_rule_keeps_the_same_tokens_in_every_reader(
    two_shard_out: Path, smollm2_tokenizer, private_datasets_cache, text: str, flags: list[str]
) -> None:
    from profit_prep.cli import build_parser, rule_params
    from profit_prep.rules.selection import parse_rule
    from profit_prep.store.reader import read_manifest
    from profit_prep.views.flat import A_ONLY, BOTH, compare_rules, iter_flat, load_flat
    from profit_prep.views.report import write_report
    from profit_prep.views.stats import compute_stats

    out = two_shard_out
    params = rule_params(build_parser().parse_args(["inspect", str(out), *flags]))
    loaded = _loaded(out, **params.given())  # load(out, strategy=..., ...) as a trainer calls it
    flat = load_flat(out, rule=params)  # inspect
    np.testing.assert_array_equal(flat.keep, loaded)
    parts = list(iter_flat(out, rule=params))  # stats, shard by shard
    assert len(parts) == 2
    by_id = {e: k for p in parts for e, k in zip(p.example_ids, np.split(p.keep, p.offsets[1:-1]))}
    np.testing.assert_array_equal(np.concatenate([by_id[e] for e in flat.example_ids]), loaded)
    stats = compute_stats(iter(parts), smollm2_tokenizer)
    assert stats["kept_tokens"] == int(loaded.sum())
    page = write_report(out, out.parent / f"{html.escape(text)[:8]}.html", rule=params,
                        tokenizer=smollm2_tokenizer).read_text()
    np.testing.assert_array_equal(_report_masked(page), ~loaded[flat.response])
    # --compare A B with A the same rule written as text: A keeps exactly these tokens.
    rule = parse_rule(text, read_manifest(out).get("mask"))
    category = compare_rules(flat, rule, None).category
    np.testing.assert_array_equal(np.isin(category, (BOTH, A_ONLY)), loaded)
    assert 0 < loaded.sum() < flat.response.sum()  # the rule really splits the tokens
    assert loaded[flat.input_ids == END].all() == (rule.protect != "none")


@pytest.mark.parametrize("text", SELECT_RULES)
def test_a_selection_rule_keeps_the_same_tokens_in_load_and_compare(
    two_shard_out: Path, private_datasets_cache, text: str
) -> None:
    from profit_prep.rules.selection import parse_rule
    from profit_prep.views.flat import A_ONLY, BOTH, compare_rules, load_flat

    rule = parse_rule(text)
    loaded = _loaded(two_shard_out, select=rule)
    flat = load_flat(two_shard_out)
    category = compare_rules(flat, rule, None).category
    np.testing.assert_array_equal(np.isin(category, (BOTH, A_ONLY)), loaded)
    assert 0 < loaded.sum() < flat.response.sum()


def test_the_stored_rule_is_the_stored_mask_everywhere(two_shard_out: Path,
                                                       private_datasets_cache) -> None:
    from profit_prep.views.flat import load_flat, rule_keep

    flat = load_flat(two_shard_out)
    loaded = _loaded(two_shard_out)
    np.testing.assert_array_equal(flat.keep, loaded)
    np.testing.assert_array_equal(rule_keep(flat, None), loaded)
    # The stored rule given again explicitly recomputes the same mask (the stored one is right).
    np.testing.assert_array_equal(_loaded(two_shard_out, tau=0.2), loaded)
