"""The executors: ``profit_prep.score`` picks one from the config, none names a backend, and a
run says the same things whichever entry point started it."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from profit_prep import ScoreConfig, score
from profit_prep.errors import InputError
from profit_prep.moved import MOVED_MODULES
from tests.conftest import DEMO_GSM8K, REPO

EXECUTORS = REPO / "profit_prep" / "executors"
CONTRACT = "profit_prep.scorers.base"


def imported_modules(source: str, package: str) -> list[str]:
    """Every module a source file imports (``from p import m`` counts as ``p.m`` too), with
    relative imports resolved against ``package`` and old paths mapped to where they moved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__")):
            found.append(str(node.args[0].value))
    moved = {f"profit_prep.{old}": f"profit_prep.{new}" for old, new in MOVED_MODULES.items()}
    return [next((new + name[len(old):] for old, new in moved.items()
                  if name == old or name.startswith(old + ".")), name) for name in found]


def backend_imports(source: str, package: str = "profit_prep.executors") -> list[str]:
    """The imports of a scorer module other than the contract (names in it are fine)."""
    return [m for m in imported_modules(source, package)
            if m.startswith("profit_prep.scorers.") and m != CONTRACT
            and not m.startswith(CONTRACT + ".")]


@pytest.mark.parametrize("source", [
    "from profit_prep.scorers.vllm_engine import worker_env",
    "import profit_prep.scorers.vllm_server",
    "from profit_prep.scorers import choose",
    "from ..scorers import top_k",
    "from profit_prep.vllm_backend import worker_env",  # an old path, moved to scorers/
    "from profit_prep import backends",
    "def f():\n    from profit_prep.scorers.choose import make_scorer\n",
    "importlib.import_module('profit_prep.scorers.vllm_engine')",
])
def test_the_import_check_sees_a_backend_import(source: str) -> None:
    assert backend_imports(source), source


def test_the_import_check_allows_the_contract() -> None:
    source = ("from profit_prep.scorers.base import Scorer\nfrom profit_prep.job import Prepared\n"
              "from profit_prep.scorers import base\nimport profit_prep.scoring\n")
    assert backend_imports(source) == []


def test_no_executor_module_imports_a_backend_module() -> None:
    files = sorted(EXECUTORS.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "base.py", "local.py", "ray.py"}
    found = {f.name: backend_imports(f.read_text()) for f in files}
    assert all(not v for v in found.values()), found
    # nor names a backend: the backend's set-up is asked through the Scorer contract
    for f in files:
        text = f.read_text()
        for needle in ("VLLM_", "claim_cpu_slot", "worker_env(job", 'backend == "vllm"'):
            assert needle not in text, (f.name, needle)


def test_a_scorer_object_with_ray_workers_is_refused(tmp_path: Path) -> None:
    from profit_prep.scorers.base import NullScorer

    config = ScoreConfig(data=str(DEMO_GSM8K), out=str(tmp_path / "o"), num_workers=2)
    with pytest.raises(InputError, match="a scorer object scores in this process"):
        score(config, scorer=NullScorer())
    assert not (tmp_path / "o").exists()


def test_every_entry_point_says_the_same_things(tmp_path: Path, tiny_model_dir: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """The end-of-turn warning (a random model masks every <|im_end|> under protect none) and
    the summary come out alike from the library, ``profit-prep score`` and a config file."""
    from profit_prep.cli import main

    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        from load_config import run
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    options = {"data": str(DEMO_GSM8K), "model": str(tiny_model_dir), "prompt_field": "question",
               "response_field": "answer", "limit": 3, "protect": "none"}

    def said(out: str) -> tuple[list[str], list[str]]:
        captured = capfd.readouterr()
        lines = [line.replace(out, "OUT") for line in captured.out.splitlines()
                 if not line.startswith("speed")]  # timings differ
        return lines, [line for line in captured.err.splitlines() if line.startswith("warning")]

    capfd.readouterr()
    library_out = str(tmp_path / "library")
    summary = score(ScoreConfig(out=library_out, quiet=True, **options))
    assert summary["end_of_turn_masked"] == summary["end_of_turn_tokens"] == 3
    _, library_warnings = said(library_out)
    assert len(library_warnings) == 1 and "end-of-turn tokens" in library_warnings[0]

    cli_out = str(tmp_path / "cli")
    args = ["score", "--out", cli_out, "--quiet"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args) == 0
    cli_lines, cli_warnings = said(cli_out)

    config_file = tmp_path / "run.toml"
    file_out = str(tmp_path / "file")
    config_file.write_text("".join(f"{k} = {json.dumps(v)}\n"  # JSON scalars are TOML's
                                   for k, v in {**options, "out": file_out, "quiet": True}.items()))
    assert run([str(config_file)]) == 0
    file_lines, file_warnings = said(file_out)

    assert cli_warnings == file_warnings == library_warnings
    assert cli_lines == file_lines and cli_lines[0] == "output      OUT"


def test_every_entry_point_reports_an_error_alike(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from profit_prep.cli import main

    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        from load_config import run
    finally:
        sys.path.remove(str(REPO / "pipelines"))
    missing = str(tmp_path / "missing.jsonl")
    assert main(["score", "--data", missing, "--out", str(tmp_path / "o")]) == 2
    cli = capfd.readouterr().err
    config_file = tmp_path / "run.toml"
    out = json.dumps(str(tmp_path / "o"))
    config_file.write_text(f"data = {json.dumps(missing)}\nout = {out}\n")
    assert run([str(config_file)]) == 2
    assert capfd.readouterr().err == cli and cli.startswith("error: ")


def test_names_moved_by_the_redesign_still_import() -> None:
    """Old paths of names this redesign moved keep working for one release."""
    import importlib

    import profit_prep.executors.base as base
    import profit_prep.scorers.transformers_model as transformers_model

    for name in ("TransformersScorer", "length_batches", "is_out_of_memory"):
        with pytest.warns(DeprecationWarning, match=f"scorers.transformers_model.{name}"):
            found = getattr(importlib.import_module("profit_prep.scorers.base"), name)
        assert found is getattr(transformers_model, name)
    local = importlib.import_module("profit_prep.executors.local")  # profit_prep.driver's
    for name in ("run_job", "format_summary", "end_of_turn_warning", "Progress", "TIMINGS"):
        assert getattr(local, name) is getattr(base, name)
    assert local.score is score  # the old path now picks its executor too
    from profit_prep.scorers.server_reading import answer_cap
    from profit_prep.scorers.vllm_server import answer_cap as old_answer_cap

    assert old_answer_cap is answer_cap


def test_a_rerun_with_nothing_to_score_keeps_the_scorer_description(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """No model loads when every shard is done; the manifest and card still say how the shards
    were scored (dtype, device), not just the backend's name."""
    config = ScoreConfig(data=str(DEMO_GSM8K), model=str(tiny_model_dir), out=str(tmp_path / "o"),
                         prompt_field="question", response_field="answer", limit=3, quiet=True)
    score(config)
    first = json.loads((tmp_path / "o" / "manifest.json").read_text())["scorer"]
    summary = score(config)
    assert summary["resumed_shards"] == 1
    again = json.loads((tmp_path / "o" / "manifest.json").read_text())["scorer"]
    assert again == first and again["dtype"] == "float32" and again["device"] == "cpu"
    assert "float32" in (tmp_path / "o" / "README.md").read_text()
    (tmp_path / "o" / "manifest.json").write_text("{damaged")  # rerun is the documented repair
    score(config)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["scorer"] == {
        "backend": "transformers"}
