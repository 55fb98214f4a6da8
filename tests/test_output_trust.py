"""The output folder's trust in the file system (docs/format.md, "What profit-prep trusts").

profit-prep writes, locks and deletes only regular files it made, never through links, on a fresh
run, a resume and ``--overwrite``; a finished shard is checked against its record before a resume
trusts it; ``verify`` and every reader cross-check the manifest's totals; a user-named output
file (``report --html``) that is a link or a device is written through, never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.store.reader import read_manifest, verify
from profit_prep.store.safe_files import atomic_write_bytes
from profit_prep.store.schema import to_table
from profit_prep.store.writer import OutputDir
from tests.conftest import DEMO_GSM8K, assert_one_error_line
from tests.test_output import PARAMS, example

# -- links and special files at profit-prep's names ------------------------------------------


def snapshot(path: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every entry under ``path``: its kind and its bytes (files) or its target (links)."""
    seen: dict[str, tuple[int, bytes | str | None]] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.lstat().st_mode
            body = (os.readlink(p) if stat.S_ISLNK(mode) else
                    p.read_bytes() if stat.S_ISREG(mode) else None)
            seen[str(p.relative_to(path))] = (stat.S_IFMT(mode), body)
    return seen


def _link_dir(entry: Path, elsewhere: Path) -> None:
    entry.symlink_to(elsewhere)


def _link_file(entry: Path, elsewhere: Path) -> None:
    entry.symlink_to(elsewhere / "victim.txt")


def _dangling(entry: Path, elsewhere: Path) -> None:
    entry.symlink_to(elsewhere / "not-yet")  # O_CREAT through it would make a file there


def _fifo(entry: Path, elsewhere: Path) -> None:
    os.mkfifo(entry)  # opening it to read or write would block


def _file_for_folder(entry: Path, elsewhere: Path) -> None:
    entry.write_text("a file where a folder belongs")


# (entry inside OUT, how it is planted): every name profit-prep writes, locks or deletes.
PLACEMENTS = [
    ("data", _link_dir), ("rejected", _link_dir), ("shards", _link_dir), ("data", _dangling),
    ("data", _file_for_folder),
    (".lock", _link_file), (".lock", _dangling), (".lock", _fifo),
    ("run.json", _link_file), ("manifest.json", _link_file), ("manifest.json", _dangling),
    ("rejected.jsonl", _link_file), ("report.html", _link_file),
    ("data/part-00000.parquet", _link_file), ("data/part-00001.parquet", _dangling),
    ("data/part-00001.parquet", _fifo), ("rejected/part-00001.jsonl", _link_file),
    ("shards/part-00001.json", _link_file), ("data/.part-00001.parquet.abcd1234", _link_file),
    (".run.json.abcd1234", _link_file),
]


def _plant(out: Path, entry: str, how: Callable[[Path, Path], None], elsewhere: Path) -> None:
    target = out / entry
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    how(target, elsewhere)


def _elsewhere(tmp_path: Path) -> Path:
    """A sibling folder of OUT that a link may point to: it must never change."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("the user's file")
    (elsewhere / "part-00000.parquet").write_bytes(b"not yours")
    (elsewhere / ".part-00001.parquet.abcd1234").write_text("looks like a temporary")
    return elsewhere


def _run(out: Path, n_shards: int, *, overwrite: bool = False, start: int = 0) -> None:
    o = OutputDir(out)
    with o.open(PARAMS, overwrite=overwrite):
        for s in range(start, n_shards):
            if not o.shard_done(s):
                o.write_shard(s, to_table([example(2 * s), example(2 * s + 1)]),
                              [{"example_id": "x", "source_index": 50 + s, "reason": "r"}])
        o.finalize({"model": {"name": "m"}}, n_shards)


@pytest.mark.parametrize("mode", ["fresh", "resume", "overwrite"])
@pytest.mark.parametrize(("entry", "how"), PLACEMENTS,
                         ids=[f"{e}-{h.__name__.strip('_')}" for e, h in PLACEMENTS])
def test_a_link_or_special_file_inside_out_is_refused_and_nothing_outside_changes(
    tmp_path: Path, entry: str, how: Callable[[Path, Path], None], mode: str
) -> None:
    out, elsewhere = tmp_path / "out", _elsewhere(tmp_path)
    if mode == "resume":  # shard 0 finished, shard 1 to do
        o = OutputDir(out)
        with o.open(PARAMS):
            o.write_shard(0, to_table([example(0)]), [])
    elif mode == "overwrite":
        _run(out, 2)
    else:
        out.mkdir()
    _plant(out, entry, how, elsewhere)
    before, planted = snapshot(elsewhere), snapshot(out)
    with pytest.raises(InputError, match="not a (file|folder) profit-prep made") as refused:
        _run(out, 2, overwrite=mode == "overwrite")
    assert "\n" not in str(refused.value) and entry.split("/")[0] in str(refused.value)
    assert snapshot(elsewhere) == before  # nothing written, deleted or created outside OUT
    assert snapshot(out) == planted  # and nothing inside: the folder is left as it was


def test_out_itself_may_be_a_link(tmp_path: Path) -> None:
    """OUT is the user's choice: a link to a folder is followed, and only there is written."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    _run(tmp_path / "out", 2)
    assert verify(tmp_path / "out") == [] and (real / "manifest.json").is_file()
    assert (tmp_path / "out").is_symlink()


def test_the_cli_refuses_a_linked_data_folder_on_resume_in_one_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out, elsewhere = tmp_path / "out", _elsewhere(tmp_path)
    _write_input(tmp_path)
    args = _score_args(out, tiny_model_dir, tmp_path)
    assert _cli(*args).returncode == 0
    shutil.move(out / "data", tmp_path / "moved")
    (out / "data").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    assert_one_error_line(_cli(*args), f"{out / 'data'} is a link, not a folder profit-prep")
    assert_one_error_line(_cli(*args, "--overwrite"), "is a link")
    assert snapshot(elsewhere) == before


def test_a_file_is_never_renamed_over_a_folder_or_a_link(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    for name in ("folder", "link"):
        with pytest.raises(InputError, match=f"{name} is a (folder|link)"):
            atomic_write_bytes(tmp_path / name, b"x")
    assert (tmp_path / "folder").is_dir() and (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["folder", "link"]  # no temporary left behind


# -- a finished shard is checked before a resume trusts it -----------------------------------


def _score_args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["score", "--data", str(data / "in.jsonl"), "--out", str(out), "--model",
            str(model), "--prompt-field", "question", "--response-field", "answer",
            "--shard-size", "3", "--max-length", "96", "--quiet", *extra]


def _write_input(folder: Path) -> None:
    """8 GSM8K rows as ``folder/in.jsonl``; rows 1 and 4 are not JSON (rejected, in shards 0
    and 1)."""
    lines = DEMO_GSM8K.read_text().splitlines()[:8]
    lines[1] = lines[4] = "{not json"
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *args],
                          capture_output=True, text=True, timeout=600)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (no interpreter and torch start per call), as ``_cli`` returns."""
    from profit_prep.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """8 GSM8K rows scored by the tiny Llama into shards of 3, 3 and 2 input rows."""
    out = tmp_path_factory.mktemp("finished") / "out"
    _write_input(out.parent)
    result = _cli(*_score_args(out, tiny_model_dir, out.parent))
    assert result.returncode == 0, result.stderr
    return out


SHARD = "data/part-00001.parquet"


def _other_parquet(out: Path) -> None:
    pq.write_table(pa.table({"a": [1, 2, 3]}), out / SHARD)


def _copied_shard(out: Path) -> None:  # a valid shard of this output, same schema and columns
    shutil.copy(out / "data" / "part-00000.parquet", out / SHARD)


def _shard_of_another_run(out: Path) -> None:  # with its record: only run.json's digest tells
    other = out.parent / "other"
    _run(other, 2)
    for name in (SHARD, "shards/part-00001.json", "rejected/part-00001.jsonl"):
        shutil.copy(other / name, out / name)


def _same_rows_other_numbers(out: Path) -> None:  # every count agrees; the logprobs do not
    table = pq.read_table(out / SHARD)
    lp = pa.array([[-1.0] * len(r) for r in table["logprobs"].to_pylist()],
                  pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.schema.get_field_index("logprobs"), "logprobs", lp),
                   out / SHARD)


def _truncated(out: Path) -> None:
    data = (out / SHARD).read_bytes()
    (out / SHARD).write_bytes(data[: len(data) // 2])


def _record_missing(out: Path) -> None:  # as an older profit-prep left it
    (out / "shards" / "part-00001.json").unlink()


def _record_damaged(out: Path) -> None:
    (out / "shards" / "part-00001.json").write_text("{not json")


def _rejected_missing(out: Path) -> None:
    (out / "rejected" / "part-00001.jsonl").unlink()


def _rejected_edited(out: Path) -> None:
    (out / "rejected" / "part-00001.jsonl").write_text("")


SHARD_DAMAGE = [_other_parquet, _copied_shard, _shard_of_another_run, _same_rows_other_numbers,
                _truncated, _record_missing, _record_damaged, _rejected_missing,
                _rejected_edited]


@pytest.mark.parametrize("damage", SHARD_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_resume_rescores_a_shard_that_is_not_the_one_it_wrote(
    finished: Path, tmp_path: Path, tiny_model_dir: Path, damage,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unfinished (no manifest) or finished, a rerun checks every shard: the damaged one is
    scored again with one line saying so, the others are kept as they are, and the output ends
    equal to the undamaged one."""
    for finished_run in (False, True):
        out = tmp_path / f"out-{finished_run}"
        shutil.copytree(finished, out)
        if not finished_run:
            (out / "manifest.json").unlink()
        damage(out)
        kept = {n: (out / n).stat().st_ino for n in ("data/part-00000.parquet",
                                                      "data/part-00002.parquet")}
        result = _main(capsys, *_score_args(out, tiny_model_dir, finished.parent))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "part-00001.parquet is not trusted" in notes[0], result.stderr
        assert {n: (out / n).stat().st_ino for n in kept} == kept  # not rescored
        assert verify(out) == []
        for name in (SHARD, "rejected.jsonl", "rejected/part-00001.jsonl"):
            if name.endswith(".parquet"):  # rescored: the same rows, tokens and masks
                _assert_same_shard(out / name, finished / name)
            else:
                assert (out / name).read_bytes() == (finished / name).read_bytes()
        assert read_manifest(out)["counts"] == read_manifest(finished)["counts"]
        rerun = _main(capsys, *_score_args(out, tiny_model_dir, finished.parent))  # trusted now
        assert rerun.returncode == 0 and "note:" not in rerun.stderr, rerun.stderr


def _assert_same_shard(a: Path, b: Path) -> None:
    """Equal shards; logprobs to float noise (a shard rescored alone is batched otherwise)."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        if name == "logprobs":
            la, lb = (np.concatenate(t[name].to_numpy(zero_copy_only=False)) for t in (ta, tb))
            np.testing.assert_allclose(la, lb, atol=1e-4, equal_nan=True)
        else:
            assert ta[name].equals(tb[name]), name


def test_a_rejected_part_gone_before_the_manifest_names_a_remedy_that_works(
    tmp_path: Path
) -> None:
    out = tmp_path / "out"
    o = OutputDir(out)
    with o.open(PARAMS):
        for s in range(2):
            o.write_shard(s, to_table([example(s)]), [{"example_id": "x", "source_index": 9,
                                                      "reason": "r"}])
        (out / "rejected" / "part-00001.jsonl").unlink()
        with pytest.raises(InputError, match="part-00001.jsonl is missing; rerun the same"):
            o.finalize({}, 2)
    assert not (out / "manifest.json").exists()
    # The remedy, followed: the rerun sees shard 1 as not done and scores it again.
    rerun = OutputDir(out)
    with rerun.open(PARAMS):
        assert rerun.shard_done(0) and not rerun.shard_done(1)
        rerun.write_shard(1, to_table([example(1)]), [{"example_id": "x", "source_index": 9,
                                                      "reason": "r"}])
        manifest = rerun.finalize({}, 2)
    assert manifest["counts"]["rejected_rows"] == 2 and verify(out) == []


# -- verify and the readers cross-check the manifest's totals --------------------------------


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        manifest = json.loads((out / "manifest.json").read_text())
        change(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _cut(m: dict) -> None:
    m["shards"] = m["shards"][:2]


def _cut_and_count(m: dict) -> None:
    _cut(m)
    m["counts"]["scored_rows"] = sum(s["rows"] for s in m["shards"])


def _cut_count_and_input(m: dict) -> None:  # every total agrees: only the data files tell
    _cut_and_count(m)
    m["input"]["limit"] = m["counts"]["scored_rows"] + m["counts"]["rejected_rows"]


def _cut_to_nothing(m: dict) -> None:
    m["shards"], m["counts"]["scored_rows"], m["input"]["limit"] = [], 0, 0
    m["input"]["rows"] = m["counts"]["rejected_rows"]


def _tokens(m: dict) -> None:
    m["counts"]["tokens"] += 7


def _rejected_count(m: dict) -> None:
    m["counts"]["rejected_rows"] += 1


MANIFEST_EDITS = {
    "shard list cut": (_edit(_cut), "shard list holds"),
    "cut, scored_rows adjusted": (_edit(_cut_and_count), "but the input had 8"),
    "cut, every total adjusted": (_edit(_cut_count_and_input), "part-00002.parquet: not in the"),
    "cut to nothing": (_edit(_cut_to_nothing), "part-00000.parquet: not in the manifest"),
    "tokens edited": (_edit(_tokens), "counts.tokens is"),
    "rejected_rows edited": (_edit(_rejected_count), "but the input had 8"),
    "rejected.jsonl emptied": (lambda out: (out / "rejected.jsonl").write_text(""),
                               "rejected.jsonl: 0 rows"),
    "a stray data file": (lambda out: shutil.copy(out / SHARD, out / "data" / "extra.parquet"),
                          "data/extra.parquet: not in the manifest"),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_verify_and_every_reader_refuse_totals_that_do_not_add_up(
    finished: Path, tmp_path: Path, tiny_model_dir: Path, edit: str,
    private_datasets_cache: None, capsys: pytest.CaptureFixture[str],
) -> None:
    from profit_prep.training.loader import load

    assert read_manifest(finished)["counts"]["rejected_rows"] > 0  # the rejected check can fail
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    change, problem = MANIFEST_EDITS[edit]
    change(out)
    result = _main(capsys, "verify", str(out))
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    assert problem in result.stdout + result.stderr, (result.stdout, result.stderr)
    with pytest.raises(InputError, match="damaged"):
        load(out)
    # "damaged", or for an empty shard list "holds no shards": one line either way
    assert_one_error_line(_main(capsys, "stats", str(out)), str(out))
    if edit != "a stray data file":  # the remedy named: the same score command rewrites it
        assert _main(capsys, *_score_args(out, tiny_model_dir, finished.parent)).returncode == 0
        assert verify(out) == [] and len(load(out)) == read_manifest(finished)["counts"][
            "scored_rows"]


# -- a user-named output file: links and devices are written through, never replaced ----------


@pytest.fixture(scope="module")
def page(finished: Path) -> bytes:
    """The report of ``finished``, as its default file holds it (less the plots' dates)."""
    from profit_prep.views.report import write_report

    return undated(write_report(finished).read_bytes())


def undated(page: bytes) -> bytes:
    """A report without the creation time matplotlib writes into each SVG plot."""
    return re.sub(rb"<dc:date>[^<]*</dc:date>", b"", page)


def test_report_to_dev_stdout_streams_and_keeps_the_status_line_apart(
    finished: Path, page: bytes, tmp_path: Path
) -> None:
    for html in ("/dev/stdout", "/proc/self/fd/1"):
        result = subprocess.run([sys.executable, "-m", "profit_prep.cli", "report", str(finished),
                                 "--html", html], capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert undated(result.stdout) == page  # only the page on stdout, the status line on stderr
        assert f"report      {html}".encode() in result.stderr
    redirected = tmp_path / "r.html"
    redirected.write_text("kept: the shell appends\n")
    with redirected.open("ab") as f:
        subprocess.run([sys.executable, "-m", "profit_prep.cli", "report", str(finished),
                        "--html", "/dev/stdout"], stdout=f, check=True, timeout=600)
    assert undated(redirected.read_bytes()) == b"kept: the shell appends\n" + page
    assert Path("/dev/stdout").is_symlink()


def _to_fifo(tmp_path: Path) -> tuple[Path, Callable[[], bytes]]:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()

    def read() -> bytes:
        reader.join(60)
        return got[0]
    return fifo, read


def test_report_through_a_link_a_fifo_or_a_device_never_replaces_it(
    finished: Path, page: bytes, tmp_path: Path
) -> None:
    from profit_prep.views.report import write_report

    elsewhere = _elsewhere(tmp_path)
    link = tmp_path / "link.html"
    link.symlink_to(elsewhere / "victim.txt")
    write_report(finished, link)
    assert link.is_symlink() and undated((elsewhere / "victim.txt").read_bytes()) == page
    fifo, read = _to_fifo(tmp_path)
    write_report(finished, fifo)
    assert undated(read()) == page and stat.S_ISFIFO(fifo.lstat().st_mode)
    write_report(finished, "/dev/null")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    plain = tmp_path / "new" / "report.html"  # a plain path: written atomically, made if missing
    write_report(finished, plain)
    assert undated(plain.read_bytes()) == page and not plain.is_symlink()


@pytest.mark.parametrize("target", ["folder", "link-to-folder", "dangling-link", "out-link"])
def test_report_to_a_path_it_must_not_write_is_one_line(
    finished: Path, tmp_path: Path, target: str
) -> None:
    elsewhere = _elsewhere(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "report.html").unlink(missing_ok=True)
    path = tmp_path / "target"
    args = ["report", str(out), "--html", str(path)]
    if target == "folder":
        path.mkdir()
    elif target == "link-to-folder":
        path.symlink_to(elsewhere)
    elif target == "dangling-link":
        path.symlink_to(elsewhere / "missing.html")
    else:  # the default OUT/report.html, a link planted inside OUT: refused, not followed
        (out / "report.html").symlink_to(elsewhere / "victim.txt")
        args = ["report", str(out)]
    before = snapshot(tmp_path)
    assert_one_error_line(_cli(*args), "error:")
    assert snapshot(tmp_path) == before
