"""ScoreConfig: sections, choices checked for the Python API as argparse checks them, the rule
fields taken from MaskRule."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from profit_prep import MaskRule, ScoreConfig
from profit_prep.config import SECTIONS
from profit_prep.errors import InputError

CHOICE_FIELDS = [(f.name, tuple(f.metadata["choices"])) for f in dataclasses.fields(ScoreConfig)
                 if "choices" in f.metadata]


def test_every_field_is_in_exactly_one_section_and_documented() -> None:
    names = [n for section in SECTIONS.values() for n in section]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(ScoreConfig))
    assert len(names) == len(set(names))
    doc = ScoreConfig.__doc__ or ""
    for title, section in SECTIONS.items():
        assert f"> {title}" in doc
        for name in section:
            assert re.search(rf"^    {name}: \S", doc, re.M), name
    for name, choices in CHOICE_FIELDS:
        assert f"Choices: {', '.join(choices)}." in doc, name


@pytest.mark.parametrize(("name", "choices"), CHOICE_FIELDS, ids=[n for n, _ in CHOICE_FIELDS])
def test_a_bogus_choice_is_refused_on_construction_with_the_choices(name: str,
                                                                    choices: tuple) -> None:
    with pytest.raises(InputError) as exc:
        ScoreConfig(data="d", out="o", **{name: "bogus"})
    assert str(exc.value) == f"unknown {name} 'bogus' (choose from {', '.join(choices)})"
    for value in choices:  # and every declared choice is accepted (server: with --server)
        extra = {"server": "http://127.0.0.1:8000"} if value == "server" else {}
        assert getattr(ScoreConfig(data="d", out="o", **{name: value}, **extra), name) == value


def test_backend_server_without_server_urls_is_refused_in_one_line() -> None:
    with pytest.raises(InputError, match="give their URLs with --server URL"):
        ScoreConfig(data="d", out="o", backend="server")


def test_the_rule_fields_are_mask_rules_in_place_and_positional_order_is_kept() -> None:
    names = [f.name for f in dataclasses.fields(ScoreConfig)]
    rule = [f.name for f in dataclasses.fields(MaskRule)]
    start = names.index("max_length") + 1
    assert names[start:start + len(rule)] == rule
    assert names[:2] == ["data", "out"] and ScoreConfig("a", "b").out == "b"
    by_name = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    for f in dataclasses.fields(MaskRule):
        assert by_name[f.name].default == f.default
        assert dict(by_name[f.name].metadata) == dict(f.metadata)
    config = ScoreConfig(data="d", out="o", strategy="random", keep_fraction=0.3, seed=5)
    assert config.mask_rule() == MaskRule("random", keep_fraction=0.3, seed=5)


def test_load_and_the_rule_params_refuse_a_bogus_choice_before_reading(tmp_path: Path) -> None:
    from profit_prep import load
    from profit_prep.rules.profit import RuleParams

    missing = tmp_path / "no-such-output"  # never read: the value is refused first
    with pytest.raises(InputError, match=r"^unknown strategy 'bogus' \(choose from higher, "
                       r"lower, middle, random\)$"):
        load(missing, strategy="bogus")
    with pytest.raises(InputError, match=r"^unknown protect 'eos' \(choose from end_of_turn, "
                       r"none\)$"):
        load(missing, protect="eos")
    with pytest.raises(TypeError):
        load(missing, tua=0.3)
    with pytest.raises(InputError, match="unknown strategy"):
        RuleParams(strategy="best")
    assert RuleParams(tau=0.3).given() == {"tau": 0.3}
