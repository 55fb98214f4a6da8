"""The output directory: lock, parameter guard, atomic shards, manifest checksums, verify."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from profit_prep.errors import InputError
from profit_prep.store.reader import read_manifest, verify
from profit_prep.store.schema import ScoredExample, to_table
from profit_prep.store.writer import OutputDir

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


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` with its bytes (None for folders and links)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink()
                                       else None) for p in sorted(path.rglob("*"))}


def _user_file(o: Path) -> None:
    (o / "train.jsonl").write_text('{"q": 1}\n')


def _user_folder(o: Path) -> None:
    (o / "checkpoints").mkdir()
    (o / "checkpoints" / "model.bin").write_bytes(b"weights")


def _user_file_in_data(o: Path) -> None:
    (o / "data").mkdir(exist_ok=True)
    (o / "data" / "mine.parquet").write_bytes(b"PAR1")


def _user_temp_like(o: Path) -> None:
    (o / ".notes.json.bak").write_text("mine")


def _symlink_out(o: Path) -> None:
    (o.parent / "elsewhere").mkdir(exist_ok=True)
    (o.parent / "elsewhere" / "x").write_text("keep")
    (o / "link").symlink_to(o.parent / "elsewhere")


USER_CONTENT = [_user_file, _user_folder, _user_file_in_data, _user_temp_like, _symlink_out]


@pytest.mark.parametrize("marked", [False, True], ids=["plain-folder", "profit-prep-output"])
@pytest.mark.parametrize("add", USER_CONTENT, ids=lambda f: f.__name__.strip("_"))
def test_overwrite_never_deletes_what_profit_prep_did_not_write(tmp_path: Path, add,
                                                                marked: bool) -> None:
    o = tmp_path / "o"
    if marked:
        write_run(o)
    else:
        o.mkdir()
    add(o)
    before = tree(tmp_path)
    with (pytest.raises(InputError, match="did not write|holds no profit-prep output"),
          OutputDir(o).open(PARAMS, overwrite=True)):
        pass
    assert tree(tmp_path) == before  # nothing removed, and no lock file left behind


def test_overwrite_replaces_an_output_of_its_own(tmp_path: Path) -> None:
    write_run(tmp_path / "o", n_shards=3)
    (tmp_path / "o" / "report.html").write_text("<html>")
    (tmp_path / "o" / "data" / ".part-00007.parquet.abcd1234").write_bytes(b"half")
    out = OutputDir(tmp_path / "o")
    with out.open({**PARAMS, "tau": 0.5}, overwrite=True):
        assert not out.shard_done(0)
        out.write_shard(0, to_table([example(0)]), [])
        manifest = out.finalize({"model": {"name": "m"}}, 1)
    assert manifest["counts"]["scored_rows"] == 1
    assert sorted(p.name for p in (tmp_path / "o" / "data").iterdir()) == ["part-00000.parquet"]
    assert not (tmp_path / "o" / "report.html").exists()


def test_resume_keeps_user_files_and_removes_only_own_temporaries(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "o")
    with out.open(PARAMS):
        out.write_shard(0, to_table([example(0)]), [])
    (tmp_path / "o" / ".notes.json.bak").write_text("mine")
    (tmp_path / "o" / "data" / ".part-00001.parquet.x1y2z3w4").write_bytes(b"half")
    with out.open(PARAMS):
        pass
    assert (tmp_path / "o" / ".notes.json.bak").exists()
    assert not (tmp_path / "o" / "data" / ".part-00001.parquet.x1y2z3w4").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", "\xff"])
def test_damaged_run_json_is_one_clear_error(tmp_path: Path, content: str) -> None:
    out = OutputDir(tmp_path / "o")
    with out.open(PARAMS):
        pass
    (tmp_path / "o" / "run.json").write_text(content, encoding="latin-1")
    with pytest.raises(InputError, match=r"run\.json is damaged.*--overwrite"), out.open(PARAMS):
        pass
    with out.open(PARAMS, overwrite=True):  # its own file: --overwrite may start it again
        pass
    assert json.loads((tmp_path / "o" / "run.json").read_text()) == PARAMS


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "o").write_text("a file")
    for overwrite in (False, True):
        with (pytest.raises(InputError, match="is a file"),
              OutputDir(tmp_path / "o").open(PARAMS, overwrite=overwrite)):
            pass
    assert (tmp_path / "o").read_text() == "a file"


def test_files_follow_the_umask(tmp_path: Path) -> None:
    """Written by a fresh process under two umasks: every file is as readable as the umask says."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
              "from tests.test_output import write_run; write_run(Path(sys.argv[1]))")
    for umask in (0o022, 0o077):
        o = tmp_path / f"o{umask:o}"
        subprocess.run(["bash", "-c", f"umask {umask:03o}; exec {sys.executable} -c \"$0\" $1",
                        script, str(o)], check=True)
        files = [p for p in o.rglob("*") if p.is_file()]
        assert len(files) >= 6
        for p in files:
            assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p, oct(p.stat().st_mode))


# -- every reader checks the shards against the manifest; damage is one error line --------------

SHARD = "data/part-00001.parquet"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """8 rows scored by the tiny Llama in shards of 3, 3 and 2 rows."""
    from tests.conftest import score_demo

    out = score_demo(tmp_path_factory.mktemp("scored") / "out", tiny_model_dir, limit=8,
                     backend="transformers")
    assert [s["rows"] for s in read_manifest(out)["shards"]] == [3, 3, 2]
    return out


def copy_of(scored: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(scored, out)
    return out


def set_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def damage_shard(out: Path, how: str) -> str:
    """Damage part-00001 one way; the problem verify reports for it."""
    shard = out / SHARD
    if how == "copied-over":  # a valid shard with the same row count: only the checksum tells
        shutil.copy(out / "data" / "part-00000.parquet", shard)
        return "checksum differs"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return "checksum differs"
    if how == "not-parquet":  # a manifest that agrees with a file Parquet cannot read
        shard.write_text("not a parquet file\n")
        digest = "sha256:" + hashlib.sha256(shard.read_bytes()).hexdigest()
        set_manifest(out, lambda m: m["shards"][1].update(sha256=digest))
        return "not a readable Parquet file"
    assert how == "missing"
    shard.unlink()
    return "missing"


@pytest.mark.parametrize("how", ["copied-over", "truncated", "not-parquet", "missing"])
def test_every_reader_refuses_a_damaged_shard_in_one_line(
    scored: Path, tmp_path: Path, how: str, private_datasets_cache: None
) -> None:
    from profit_prep.training.loader import load
    from tests.conftest import assert_one_error_line

    out = copy_of(scored, tmp_path)
    problem = damage_shard(out, how)
    for command in ("stats", "inspect", "report"):
        result = run_cli(command, str(out))
        assert_one_error_line(result, f"{out}: damaged output: {SHARD}")
        assert f"profit-prep verify {out}" in result.stderr and result.stdout == ""
    assert not (out / "report.html").exists()
    result = run_cli("verify", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"problem: {SHARD}: {problem}")
    with pytest.raises(InputError, match=f"{SHARD}: {problem}"):
        load(out)


def test_a_copied_shard_passes_a_row_count_check_but_not_the_checksum(
    scored: Path, tmp_path: Path
) -> None:
    from profit_prep.store.reader import check_shards, shard_problems

    out = copy_of(scored, tmp_path)
    damage_shard(out, "copied-over")
    manifest = read_manifest(out)
    assert shard_problems(out, manifest, checksum=False) == []  # same rows, same columns
    with pytest.raises(InputError, match="part-00001.parquet: checksum differs"):
        check_shards(out, manifest)


MANIFEST_DAMAGE = {
    "invalid JSON": lambda f: f.write_text('{"format_version": 1, "shards": [}'),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "empty": lambda f: f.write_text(""),
    "not an object": lambda f: f.write_text("[1, 2, 3]\n"),
    "no shards": lambda f: f.write_text(json.dumps(
        {k: v for k, v in json.loads(f.read_text()).items() if k != "shards"})),
    "shards not a list": lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "shards": {"file": SHARD}})),
    "shard without rows": lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "shards": [{"file": SHARD, "sha256": "x"}]})),
    "shard outside data/": lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()),
         "shards": [{"file": "../../etc/passwd", "rows": 1, "sha256": "x"}]})),
    "tokenizer not an object": lambda f: f.write_text(json.dumps(
        {**json.loads(f.read_text()), "tokenizer": "/somewhere"})),
    "not UTF-8": lambda f: f.write_bytes(b'{"shards": "\xff\xfe"}'),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_one_error_line(
    scored: Path, tmp_path: Path, damage: str, private_datasets_cache: None
) -> None:
    from profit_prep.training.loader import load
    from tests.conftest import assert_one_error_line

    out = copy_of(scored, tmp_path)
    MANIFEST_DAMAGE[damage](out / "manifest.json")
    for command in ("stats", "inspect", "report", "verify", "manifest"):
        result = run_cli(command, str(out))
        assert_one_error_line(result, f"{out / 'manifest.json'} is damaged")
        assert "rerun the same `profit-prep score` command" in result.stderr
    with pytest.raises(InputError, match="is damaged"):
        load(out)


def test_a_malformed_mask_in_the_manifest_is_one_error_line(scored: Path, tmp_path: Path) -> None:
    from tests.conftest import assert_one_error_line

    out = copy_of(scored, tmp_path)
    set_manifest(out, lambda m: m.update(mask={"strategy": "higher", "tau": "high"}))
    for command in ("stats", "inspect", "report"):
        assert_one_error_line(run_cli(command, str(out)), "the manifest's mask is malformed")


def test_finalize_sums_footer_counts_and_they_equal_the_columns(tmp_path: Path,
                                                               monkeypatch) -> None:
    import pyarrow.parquet as pq

    from profit_prep.store.shard_counts import SHARD_COUNTS_KEY

    eot = [int(example(0).input_ids[-1]), int(example(3).input_ids[4])]
    out = OutputDir(tmp_path / "o")
    reason = "line\u2028separator"  # splitlines() would count this rejection twice
    with out.open(PARAMS):
        for s in range(3):
            examples = [example(2 * s), example(2 * s + 1)]
            out.write_shard(s, to_table(examples),
                            [{"example_id": "bad", "source_index": 90 + s, "reason": reason}],
                            end_of_turn_ids=eot, formats=["messages", "alpaca" if s else None])
        # From the footers alone: no column is read.
        with monkeypatch.context() as m:
            m.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read columns"))
            from_footers = out.finalize({"render": {"format": "auto"}}, 3, eot)
    assert from_footers["render"]["formats"] == {"alpaca": 2, "messages": 3}
    assert from_footers["counts"]["rejected_rows"] == 3
    assert from_footers["counts"]["end_of_turn_tokens"] > 0
    # The same shards without stored counts (as written before they were kept): read columns.
    for s in range(3):
        path = tmp_path / "o" / "data" / f"part-0000{s}.parquet"
        table = pq.read_table(path)
        meta = {k: v for k, v in table.schema.metadata.items() if k != SHARD_COUNTS_KEY}
        pq.write_table(table.replace_schema_metadata(meta), path)
        (tmp_path / "o" / "shards" / f"part-0000{s}.json").unlink()  # older outputs had none
    with out.open(PARAMS):
        from_columns = out.finalize({"render": {"format": "auto"}}, 3, eot)
    assert from_columns["counts"] == from_footers["counts"]
    assert "formats" not in from_columns["render"]  # unknown: not claimed
    # End-of-turn counts made for other ids are recounted, not reused.
    with out.open(PARAMS):
        other = out.finalize({}, 3, eot[:1])
    tokens = pq.read_table(tmp_path / "o" / "data")
    ids, resp = (np.concatenate(tokens[c].to_pylist()) for c in ("input_ids", "response_mask"))
    assert other["counts"]["end_of_turn_tokens"] == int((resp & (ids == eot[0])).sum())


def test_names_that_moved_out_of_output_still_import_with_a_warning() -> None:
    """One release of grace for code that imported the reader and file helpers from output."""
    import importlib

    import profit_prep.store.writer as old

    for name, module in old._MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"profit_prep.{module}"):
            moved = getattr(old, name)
        assert moved is getattr(importlib.import_module(f"profit_prep.{module}"), name)
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018
