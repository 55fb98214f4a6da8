"""profit_prep.moved: every import path that moved in 0.3 still imports, warns, and is the same
module object as the new path (so code patching one patches the other)."""

import importlib
import sys

import pytest

from profit_prep.moved import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_is_the_new_module_with_a_warning(old: str) -> None:
    new = importlib.import_module(f"profit_prep.{MOVED_MODULES[old]}")
    sys.modules.pop(f"profit_prep.{old}", None)  # import it afresh: the warning comes once
    with pytest.warns(DeprecationWarning, match=f"profit_prep.{MOVED_MODULES[old]}"):
        moved = importlib.import_module(f"profit_prep.{old}")
    assert moved is new


@pytest.mark.parametrize(("package", "name", "new"), [
    ("profit_prep.rules", "parse_rule", "profit_prep.rules.selection"),
    ("profit_prep.rules", "Select", "profit_prep.rules.selection"),
    ("profit_prep.rendering", "Renderer", "profit_prep.rendering.renderer"),
])
def test_names_of_a_module_that_became_a_folder_resolve_with_a_warning(
        package: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
        found = getattr(importlib.import_module(package), name)
    assert found is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        importlib.import_module(package).no_such_name  # noqa: B018


def test_the_old_paths_in_the_table_are_gone_from_the_tree_and_the_new_ones_exist() -> None:
    root = importlib.import_module("profit_prep").__path__[0]
    from pathlib import Path

    for old, new in MOVED_MODULES.items():
        assert not (Path(root) / f"{old.replace('.', '/')}.py").exists(), old
        assert importlib.util.find_spec(f"profit_prep.{new}") is not None, new
