"""``--data s3://...`` (profit_prep.inputs.remote), against a real S3-protocol server on loopback:
the same output as the local file, the store's identity checked before the manifest, a
verified cached copy, and no credential anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profit_prep import ScoreConfig, score
from profit_prep.cli import main
from profit_prep.errors import InputError
from profit_prep.inputs import remote
from profit_prep.job import prepare
from tests.conftest import DEMO_GSM8K
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET


@pytest.fixture(autouse=True)
def _private_cache(tiny_model_dir: Path, tmp_path_factory, monkeypatch) -> None:
    """Copies go to a temporary cache (after the tiny model is built in the real one)."""
    monkeypatch.setenv("PROFIT_PREP_CACHE", str(tmp_path_factory.mktemp("cache")))


def _rows(n: int = 7) -> list[dict]:
    rows = [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()[:n]]
    rows[4]["answer"] = ""  # one rejected row: its reason must match too
    return rows


def _config(data: str, out: Path, model: Path, **extra: object) -> ScoreConfig:
    return ScoreConfig(data=data, out=str(out), model=str(model), prompt_field="question",
                       response_field="answer", shard_size=3, quiet=True, **extra)


def _put(server, url: str, body: bytes) -> None:
    bucket, _, key = url[len("s3://"):].partition("/")
    server.client().put_object(Bucket=bucket, Key=key, Body=body)


def _same_output(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in (a / "data").iterdir())
    assert files and files == sorted(p.relative_to(b) for p in (b / "data").iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "rejected.jsonl").read_bytes() == (b / "rejected.jsonl").read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["counts"] == mb["counts"] and ma["shards"] == mb["shards"]


def _no_secret(root: Path, *texts: str) -> None:
    for text in texts:
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE_SECRET.encode() not in data and FAKE_KEY_ID.encode() not in data, f


def test_jsonl_on_the_store_gives_the_local_output(
    s3_bucket: str, s3_env, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    local = tmp_path / "train.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    url = f"{s3_bucket}/sets/train.jsonl"
    _put(s3_env, url, local.read_bytes())
    score(_config(str(local), tmp_path / "a", tiny_model_dir))
    assert main(["score", "--data", url, "--out", str(tmp_path / "b"), "--model",
                 str(tiny_model_dir), "--prompt-field", "question", "--response-field",
                 "answer", "--shard-size", "3"]) == 0
    _same_output(tmp_path / "a", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input"]["path"] == url
    assert json.loads((tmp_path / "b" / "run.json").read_text())["data"] == url
    assert f"name: {url}" in (tmp_path / "b" / "README.md").read_text()
    printed = capsys.readouterr()
    _no_secret(tmp_path / "b", printed.out, printed.err)
    _no_secret(remote._cache_root())


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_parquet_on_the_store_gives_the_local_output(
    layout: str, s3_bucket: str, s3_env, tmp_path: Path, tiny_model_dir: Path
) -> None:
    rows = _rows()
    folder = tmp_path / "pq"
    folder.mkdir()
    if layout == "file":
        pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
        local, url = folder / "train.parquet", f"{s3_bucket}/pq/train.parquet"
    else:  # two files: their order (by name) is the row order, as for a local folder
        pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "a.parquet")
        pq.write_table(pa.Table.from_pylist(rows[4:]), folder / "b.parquet")
        local, url = folder, f"{s3_bucket}/pq"
    for f in sorted(folder.iterdir()):
        _put(s3_env, f"{s3_bucket}/pq/{f.name}", f.read_bytes())
    score(_config(str(local), tmp_path / "a", tiny_model_dir))
    score(_config(url, tmp_path / "b", tiny_model_dir))
    _same_output(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["counts"][
        "rejected_rows"] == 1


def test_an_input_rewritten_during_the_run_gets_no_manifest(
    s3_bucket: str, s3_env, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = f"{s3_bucket}/train.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in _rows())
    _put(s3_env, url, body.encode())
    prepared = prepare(_config(url, tmp_path / "out", tiny_model_dir))
    assert [s[0] for s in prepared.input_stamp] == ["train.jsonl"]
    prepared.check_input_unchanged()  # nothing changed: fine
    _put(s3_env, url, body.encode())  # the same bytes again: a new write all the same
    _put(s3_env, url, body.replace("Natalia", "Natalie").encode())
    with pytest.raises(InputError, match="changed while this run was reading it"):
        prepared.check_input_unchanged()


def test_resume_refuses_an_edited_input(
    s3_bucket: str, s3_env, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = f"{s3_bucket}/train.jsonl"
    rows = _rows()
    _put(s3_env, url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = tmp_path / "out"
    score(_config(url, out, tiny_model_dir))
    (out / "manifest.json").unlink()
    (out / "data" / "part-00002.parquet").unlink()  # as if killed before the last shard
    rows[0]["answer"] += " (edited)"
    _put(s3_env, url, "".join(json.dumps(r) + "\n" for r in rows).encode())
    with pytest.raises(InputError, match="rows 0-2 differ"):
        score(_config(url, out, tiny_model_dir))


def test_the_copy_is_reused_while_unchanged_and_fetched_again_when_damaged(
    s3_bucket: str, s3_env, monkeypatch
) -> None:
    url = f"{s3_bucket}/d/train.jsonl"
    _put(s3_env, url, b'{"question": "q", "answer": "a"}\n')
    calls = []
    real = remote._download
    monkeypatch.setattr(remote, "_download", lambda *a: calls.append(a[1]) or real(*a))
    first = remote.local_copy(url, None, remote.stamp(url))
    assert first.read_bytes() == b'{"question": "q", "answer": "a"}\n' and len(calls) == 1
    assert remote.local_copy(url, None, remote.stamp(url)) == first and len(calls) == 1
    first.write_bytes(b'{"question": "x", "answer": "a"}\n')  # same size, other bytes
    again = remote.local_copy(url, None, remote.stamp(url))
    assert again.read_bytes() == b'{"question": "q", "answer": "a"}\n' and len(calls) == 2
    assert "s3:" not in str(again) and s3_bucket[5:] not in str(again)  # key: a hash of the URL
    _put(s3_env, url, b'{"question": "q2", "answer": "a"}\n')  # a new version: a new copy
    newer = remote.local_copy(url, None, remote.stamp(url))
    assert newer.read_bytes() == b'{"question": "q2", "answer": "a"}\n' and not first.exists()


def test_store_errors_are_one_line_without_credentials(
    s3_bucket: str, s3_env, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    args = ["--out", str(tmp_path / "o"), "--model", str(tiny_model_dir), "--prompt-field",
            "question", "--response-field", "answer"]
    for data, reason in ((f"{s3_bucket}/missing.jsonl", "no such object"),
                         (f"{s3_bucket}/empty/", "no such object or prefix"),
                         (f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@{s3_bucket[5:]}/x.jsonl",
                          "embeds credentials")):
        assert main(["score", "--data", data, *args]) == 2
        printed = capsys.readouterr()
        errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0], printed.err
        _no_secret(tmp_path, printed.out, printed.err)
