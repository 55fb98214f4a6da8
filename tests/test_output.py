"""The output directory: lock, parameter guard, atomic shards, manifest checksums, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from profit_prep.errors import InputError
from profit_prep.format import ScoredExample, to_table
from profit_prep.output import OutputDir, read_manifest, verify

PARAMS = {"tau": 0.1, "data": "x.jsonl"}


def example(i: int, n: int = 6) -> ScoredExample:
    rng = np.random.default_rng(i)
    lp = np.log(rng.uniform(0.01, 1, n)).astype(np.float32)
    lp[0] = np.nan
    resp = np.arange(n) >= 2
    return ScoredExample(str(i), i, rng.integers(0, 100, n).astype(np.int32), resp, lp,
                         resp & (np.exp(lp) >= 0.1), False, n)


def write_run(path: Path, n_shards: int = 2) -> dict:
    out = OutputDir(path)
    with out.open(PARAMS):
        for s in range(n_shards):
            out.write_shard(s, to_table([example(2 * s), example(2 * s + 1)]),
                            [{"example_id": "bad", "source_index": 99, "reason": "r"}] if s else [])
        return out.finalize({"model": {"name": "m"}}, n_shards)


def test_manifest_counts_and_rejected_gathered(tmp_path: Path) -> None:
    manifest = write_run(tmp_path / "o")
    assert manifest["counts"]["scored_rows"] == 4 and manifest["counts"]["rejected_rows"] == 1
    assert [s["rows"] for s in manifest["shards"]] == [2, 2]
    assert json.loads((tmp_path / "o" / "rejected.jsonl").read_text())["reason"] == "r"
    assert read_manifest(tmp_path / "o")["model"] == {"name": "m"}
    assert verify(tmp_path / "o") == []


def test_verify_finds_a_damaged_shard(tmp_path: Path) -> None:
    write_run(tmp_path / "o")
    shard = tmp_path / "o" / "data" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "o" / "data" / "part-00000.parquet").unlink()
    problems = verify(tmp_path / "o")
    assert any("part-00000" in p and "missing" in p for p in problems)
    assert any("part-00001" in p and "checksum" in p for p in problems)


def test_second_run_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    with (
        OutputDir(tmp_path / "o").open(PARAMS),
        pytest.raises(InputError, match="lock held"),
        OutputDir(tmp_path / "o").open(PARAMS),
    ):
        pass


def test_other_parameters_are_refused_unless_overwrite(tmp_path: Path) -> None:
    write_run(tmp_path / "o")
    with pytest.raises(InputError, match="tau differ"), OutputDir(tmp_path / "o").open(
        {**PARAMS, "tau": 0.2}
    ):
        pass
    with OutputDir(tmp_path / "o").open({**PARAMS, "tau": 0.2}, overwrite=True) as out:
        assert not out.shard_done(0)  # replaced: old shards are gone


def test_unfinished_run_is_reported_as_such(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "o")
    with out.open(PARAMS):
        out.write_shard(0, to_table([example(0)]), [])
    with pytest.raises(InputError, match="has not finished"):
        read_manifest(tmp_path / "o")


def test_foreign_directory_is_not_wiped(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"), OutputDir(tmp_path / "o").open(PARAMS):
        pass
    assert (tmp_path / "o" / "precious.txt").exists()
