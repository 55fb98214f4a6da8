"""Two-model scores: load(OUT, reference=OTHER) and `profit-prep combine` join by example_id,
and refuse outputs whose tokens differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.cli import main as cli
from profit_prep.errors import InputError
from profit_prep.rules.selection import Select
from profit_prep.store.reader import read_manifest, verify
from profit_prep.training.loader import load
from tests.conftest import score_demo
from tests.test_rules import rows_of

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """6 rows scored twice by the tiny model: bfloat16 vs float32 gives different logprobs."""
    base = tmp_path_factory.mktemp("pair")
    a = score_demo(base / "a", tiny_model_dir, limit=6, dtype="bfloat16")
    b = score_demo(base / "b", tiny_model_dir, limit=6, shard_size=4)
    return a, b


def test_excess_loss_equals_difference_of_losses(pair: tuple[Path, Path]) -> None:
    a, b = pair
    rows_a, rows_b = rows_of(a), rows_of(b)
    ds = load(a, reference=b)
    assert "excess_loss" in ds.column_names
    differs = 0
    for e, x in zip(ds["example_id"], ds["excess_loss"], strict=True):
        x = np.array(x, float)
        want = (-rows_a[e]["logprobs"]) - (-rows_b[e]["logprobs"])
        assert np.isnan(x[0])
        np.testing.assert_allclose(x[1:], want[1:], atol=1e-6, rtol=0)
        differs += int(np.any(np.abs(want[1:]) > 1e-4))
    assert differs > 0  # the two models really differ


def test_refused_naming_first_row_whose_tokens_differ(
    pair: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    a, _ = pair
    lengths = {r["example_id"]: len(r["input_ids"]) for r in pq.read_table(a / "data").to_pylist()}
    cut = sorted(lengths.values())[-1] - 1  # truncating at this length changes only the longest
    other = score_demo(tmp_path / "cut", tiny_model_dir, limit=6, max_length=cut)
    order = pq.read_table(a / "data", columns=["example_id"])["example_id"].to_pylist()
    first = next(e for e in order if lengths[e] > cut)
    with pytest.raises(InputError, match=f"input_ids differ for example_id '{first}'"):
        load(a, reference=other)
    partial = score_demo(tmp_path / "partial", tiny_model_dir, limit=4)
    with pytest.raises(InputError, match="is not in the reference output"):
        load(a, reference=partial)


def test_combine_writes_both_models_columns_that_any_reader_and_the_loader_use(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import duckdb

    a, b = pair
    into = tmp_path / "ab"
    assert cli(["combine", str(a), "--reference", str(b), "--into", str(into)]) == 0
    assert "6 rows" in capsys.readouterr().out
    assert verify(into) == []
    manifest = read_manifest(into)
    assert {"reference_logprobs", "excess_loss"} <= set(manifest["columns"])
    assert manifest["reference"]["path"] == str(b) and manifest["combined_from"]["path"] == str(a)
    rows_a, rows_b = rows_of(a), rows_of(b)
    for r in pq.read_table(into / "data").to_pylist():
        e = r["example_id"]
        ref_lp = np.array(r["reference_logprobs"], float)
        np.testing.assert_array_equal(ref_lp[1:], rows_b[e]["logprobs"][1:])
        np.testing.assert_array_equal(np.array(r["input_ids"]), rows_a[e]["input_ids"])
        np.testing.assert_allclose(np.array(r["excess_loss"], float)[1:],
                                   (rows_b[e]["logprobs"] - rows_a[e]["logprobs"])[1:], atol=1e-6)
    # A plain SQL reader sees the new columns; the loader's rule on them equals the live join.
    (n,) = duckdb.sql(f"select count(*) from '{into}/data/*.parquet' "
                      "where len(excess_loss) = len(input_ids)").fetchall()[0]
    assert n == 6
    rule = Select("top", "excess_loss", fraction=0.5, scope="global")
    stored = load(into, select=rule)
    live = load(a, select=rule, reference=b)
    assert stored["completion_mask"] == live["completion_mask"]
    assert sum(map(sum, stored["completion_mask"])) > 0
    # Reruns: a finished output is kept; --overwrite replaces it.
    assert cli(["combine", str(a), "--reference", str(b), "--into", str(into)]) == 0
    assert cli(["combine", str(a), "--reference", str(b), "--into", str(into),
                "--overwrite"]) == 0


def test_combine_refuses_other_tokens_with_the_row_and_writes_nothing(
    pair: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, _ = pair
    lengths = {r["example_id"]: len(r["input_ids"]) for r in pq.read_table(a / "data").to_pylist()}
    other = score_demo(tmp_path / "cut", tiny_model_dir, limit=6,
                       max_length=max(lengths.values()) - 1)
    into = tmp_path / "ab"
    capsys.readouterr()  # drop the scoring run's own output
    assert cli(["combine", str(a), "--reference", str(other), "--into", str(into)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: input_ids differ for example_id")
    assert not into.exists()
    with pytest.raises(InputError, match="needs reference=OTHER_OUT"):
        load(a, select=Select("top", "excess_loss", fraction=0.5))


def test_a_missing_rejected_part_is_refused_and_the_named_remedy_works(
    pair: tuple[Path, Path], tiny_model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Never combined as "no rejected rows": refused in one line, and the rerun it names (the
    same score command) restores the file, after which the combine goes through."""
    import shutil

    a, b = pair
    copy = tmp_path / "a"
    shutil.copytree(a, copy)
    (copy / "rejected" / "part-00001.jsonl").unlink()
    into = tmp_path / "ab"
    capsys.readouterr()
    assert cli(["combine", str(copy), "--reference", str(b), "--into", str(into)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00001.jsonl is missing; rerun the `profit-prep score`" in err[0]
    assert not (into / "manifest.json").exists()
    score_demo(copy, tiny_model_dir, limit=6, dtype="bfloat16")  # the command that wrote it
    assert (copy / "rejected" / "part-00001.jsonl").is_file() and verify(copy) == []
    assert cli(["combine", str(copy), "--reference", str(b), "--into", str(into)]) == 0
    assert read_manifest(into)["counts"]["scored_rows"] == read_manifest(a)["counts"][
        "scored_rows"]
