"""``gs://`` outputs and inputs against a real GCS JSON-API server (gcp-storage-emulator on
127.0.0.1, tests/gcs_server.py), through gcsfs: the same bytes as a local run, resume, the
readers, ``--data gs://`` and ``--overwrite``, as tests/test_object_store.py,
tests/test_remote_input.py and tests/test_store_cache.py check them on S3.

The emulator does not honour preconditions: its upload handlers
(gcp_storage_emulator/handlers/objects.py, ``_media_upload`` / ``_multipart_upload``) never read
``ifGenerationMatch``, so a conditional create over an existing object succeeds there. The
lock's exclusivity (a second writer refused, racing writers, a stale lease taken over, a lost
lease) therefore cannot be shown on it and is tested on S3 only (tests/test_object_store.py);
here the lock's single-writer life (create, release) is. Its renewal is not either (see the
skip on test_the_gcs_lock_is_renewed_by_generation).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from profit_prep import load, score
from profit_prep.cli import main
from profit_prep.errors import InputError
from profit_prep.store.lease import Lease
from profit_prep.store.reader import verify
from profit_prep.store.urls import filesystem
from tests.conftest import DEMO_GSM8K, assert_one_error_line
from tests.gcs_server import GCSServer, environ_with
from tests.store_runs import (
    assert_same_output,
    bucket_of,
    cli_score,
    config,
    local_files,
    under,
)

PRECONDITIONS = ("gcp-storage-emulator ignores ifGenerationMatch (handlers/objects.py "
                 "_media_upload/_multipart_upload never read it): the lock's exclusivity is "
                 "tested on S3 only")


@pytest.fixture()
def _private_caches(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch, private_datasets_cache: None) -> None:
    """Copies and cached outputs go to a temporary cache (after the tiny model is built)."""
    monkeypatch.setenv("PROFIT_PREP_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_score_to_gcs_writes_the_same_bytes_as_a_local_run(
    tmp_path: Path, tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer
) -> None:
    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=8))
    summary = score(config(f"{gcs_bucket}/run", tiny_model_dir, limit=8))
    remote = under(gcs_env.objects(bucket_of(gcs_bucket)), "run")
    assert {k for k in remote if k.startswith("data/")} == {
        "data/part-00000.parquet", "data/part-00001.parquet", "data/part-00002.parquet"}
    assert "README.md" in remote  # the dataset card, written after the manifest
    assert_same_output(remote, local)
    assert summary["out"] == f"{gcs_bucket}/run" and summary["scored_rows"] == 8
    assert ".lock" not in remote  # released at the end


def test_the_cli_scores_to_gcs_in_a_subprocess(
    tmp_path: Path, tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer
) -> None:
    """The environment alone (no storage options) points a fresh process's gcsfs at the
    server: what a user's shell does."""
    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=5))
    out = f"{gcs_bucket}/cli"
    result = subprocess.run(cli_score(out, tiny_model_dir, 5, 3), env=environ_with(gcs_env),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_output(under(gcs_env.objects(bucket_of(gcs_bucket)), "cli"), local)


def test_a_rerun_on_gcs_resumes_and_refuses_a_changed_input(
    tmp_path: Path, tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer
) -> None:
    data = tmp_path / "d.jsonl"
    lines = DEMO_GSM8K.read_text().splitlines()[:6]
    data.write_text("\n".join(lines) + "\n")
    out = f"{gcs_bucket}/run"
    score(config(out, tiny_model_dir, data=str(data), limit=None))
    finished = under(gcs_env.objects(bucket_of(gcs_bucket)), "run")
    # A finished output: a rerun scores nothing and leaves every shard as it was.
    again = score(config(out, tiny_model_dir, data=str(data), limit=None))
    assert again["resumed_shards"] == 2
    after = under(gcs_env.objects(bucket_of(gcs_bucket)), "run")
    rewritten = ("manifest.json", "README.md")  # written again at the end of every run
    assert {k: v for k, v in after.items() if k not in rewritten} == {
        k: v for k, v in finished.items() if k not in rewritten}
    # As if killed before the second shard's data: only that shard is scored again.
    fs, root = filesystem(out)
    fs.rm_file(f"{root}/data/part-00001.parquet")
    fs.rm_file(f"{root}/manifest.json")
    summary = score(config(out, tiny_model_dir, data=str(data), limit=None))
    assert summary["resumed_shards"] == 1
    rebuilt = under(gcs_env.objects(bucket_of(gcs_bucket)), "run")
    assert rebuilt["data/part-00001.parquet"] == finished["data/part-00001.parquet"]
    changed = json.loads(lines[0])
    changed["answer"] += " (edited)"
    data.write_text("\n".join([json.dumps(changed), *lines[1:]]) + "\n")
    with pytest.raises(InputError, match="changed since this output was started"):
        score(config(out, tiny_model_dir, data=str(data), limit=None))


def test_a_replaced_shard_on_gcs_is_not_trusted_and_scored_again(
    tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer, capfd: pytest.CaptureFixture[str]
) -> None:
    out, bucket = f"{gcs_bucket}/run", bucket_of(gcs_bucket)
    score(config(out, tiny_model_dir, limit=6))
    before = under(gcs_env.objects(bucket), "run")
    gcs_env.put(bucket, "run/data/part-00000.parquet", before["data/part-00001.parquet"])
    gcs_env.delete(bucket, "run/manifest.json")
    capfd.readouterr()
    summary = score(config(out, tiny_model_dir, limit=6))
    notes = [line for line in capfd.readouterr().err.splitlines() if "is not trusted" in line]
    assert len(notes) == 1 and "part-00000" in notes[0] and "its record" in notes[0]
    assert summary["resumed_shards"] == 1
    after = under(gcs_env.objects(bucket), "run")
    assert after["data/part-00000.parquet"] == before["data/part-00000.parquet"]


def test_verify_load_and_stats_read_a_gcs_output(
    tmp_path: Path, tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer,
    _private_caches: None, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=8))
    url = f"{gcs_bucket}/run"
    score(config(url, tiny_model_dir, limit=8))
    assert verify(url) == []
    assert main(["verify", url]) == 0 and capsys.readouterr().out.strip() == "ok"
    for kwargs in ({}, {"tau": 0.3, "labels": True}):
        remote_ds, local_ds = load(url, **kwargs), load(local, **kwargs)
        assert remote_ds.features == local_ds.features
        assert json.dumps(remote_ds.to_list(), allow_nan=True) == json.dumps(
            local_ds.to_list(), allow_nan=True)
    printed = []
    for where in (str(local), url):
        assert main(["stats", where, "--json", "--tau", "0.3"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and json.loads(printed[1])
    # A shard changed on the store: verify names it, and the readers refuse the output.
    bucket = bucket_of(gcs_bucket)
    gcs_env.put(bucket, "run/data/part-00001.parquet",
                (local / "data" / "part-00000.parquet").read_bytes())
    assert verify(url) == ["data/part-00001.parquet: checksum differs from the manifest "
                           "(changed, replaced or truncated)"]
    with pytest.raises(InputError, match="damaged output: data/part-00001.parquet"):
        load(url)
    assert main(["stats", url]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "damaged output" in err


def test_jsonl_on_gcs_gives_the_local_output(
    tmp_path: Path, tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer,
    _private_caches: None
) -> None:
    rows = [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()[:7]]
    rows[4]["answer"] = ""  # one rejected row: its reason must match too
    local = tmp_path / "train.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = f"{gcs_bucket}/sets/train.jsonl"
    gcs_env.put(bucket_of(gcs_bucket), "sets/train.jsonl", local.read_bytes())
    score(config(str(tmp_path / "a"), tiny_model_dir, data=str(local), limit=None))
    assert main(["score", "--data", url, "--out", str(tmp_path / "b"), "--model",
                 str(tiny_model_dir), "--prompt-field", "question", "--response-field",
                 "answer", "--shard-size", "3", "--quiet"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    mine, theirs = local_files(a), local_files(b)
    assert sorted(mine) == sorted(theirs)
    for name in mine:  # run.json, the card and the shard records name the input: the URL
        if name.startswith(("data/", "rejected")):
            assert theirs[name] == mine[name], name
    ma, mb = (json.loads(p.read_text()) for p in (a / "manifest.json", b / "manifest.json"))
    assert ma["counts"] == mb["counts"] and ma["shards"] == mb["shards"]
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["input"]["path"] == url and manifest["counts"]["rejected_rows"] == 1
    assert json.loads((b / "run.json").read_text())["data"] == url
    # The object rewritten with other rows: a resume of that output refuses it.
    (b / "manifest.json").unlink()
    (b / "data" / "part-00002.parquet").unlink()
    rows[0]["answer"] += " (edited)"
    gcs_env.put(bucket_of(gcs_bucket), "sets/train.jsonl",
                "".join(json.dumps(r) + "\n" for r in rows).encode())
    with pytest.raises(InputError, match="rows 0-2 differ"):
        score(config(str(b), tiny_model_dir, data=url, limit=None))


def test_overwrite_on_gcs_deletes_only_its_own_objects(
    tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer
) -> None:
    bucket = bucket_of(gcs_bucket)
    # Beside the output: names that share its prefix as a string, and own names elsewhere.
    siblings = {"run2/data/part-00000.parquet": b"not ours", "run.json": b"{}",
                "runx": b"x", "other/run/manifest.json": b"{}"}
    for key, body in siblings.items():
        gcs_env.put(bucket, key, body)
    out = f"{gcs_bucket}/run"
    score(config(out, tiny_model_dir, limit=6))
    stale = "run/data/part-00009.parquet"  # an own name this run no longer writes
    gcs_env.put(bucket, stale, b"old")
    score(config(out, tiny_model_dir, limit=3, overwrite=True))
    objects = gcs_env.objects(bucket)
    assert {k: objects[k] for k in siblings} == siblings
    assert stale not in objects
    assert sorted(k for k in under(objects, "run") if k.startswith("data/")) == [
        "data/part-00000.parquet"]
    # A foreign object inside the output: --overwrite refuses and deletes nothing.
    gcs_env.put(bucket, "run/notes.txt", b"mine")
    before = gcs_env.objects(bucket)
    with pytest.raises(InputError, match=r"did not write \(notes.txt\)"):
        score(config(out, tiny_model_dir, limit=3, overwrite=True))
    assert gcs_env.objects(bucket) == before


def test_a_gcs_prefix_holding_foreign_objects_is_refused(
    tiny_model_dir: Path, gcs_bucket: str, gcs_env: GCSServer
) -> None:
    gcs_env.put(bucket_of(gcs_bucket), "run/data.csv", b"a,b")
    with pytest.raises(InputError, match="holds no profit-prep output"):
        score(config(f"{gcs_bucket}/run", tiny_model_dir, limit=3))


def test_the_gcs_lock_is_created_and_released(gcs_bucket: str, gcs_env: GCSServer) -> None:
    """The lock's single-writer life on the JSON API: created (``ifGenerationMatch=0``, which
    this server does not enforce), its generation read back, deleted on release."""
    out = f"{gcs_bucket}/run"
    fs, root = filesystem(out)
    lease = Lease(fs, f"{root}/.lock", out, lease_s=30)
    lease.acquire()
    try:
        held = json.loads(gcs_env.get(bucket_of(gcs_bucket), "run/.lock"))
        assert held["run"] == lease.run_id and held["owner"] == lease.owner
        assert lease.version == str(fs.info(f"{root}/.lock")["generation"])
        lease.check()
    finally:
        lease.release()
    assert "run/.lock" not in gcs_env.names(bucket_of(gcs_bucket))


@pytest.mark.skip(reason="gcp-storage-emulator parses any application/json request body as JSON "
                         "(server.py _read_data), so the lock's renewal, a media upload of JSON "
                         "bytes (lease.py _gcs_replace), reaches _media_upload as a dict and "
                         "fails there (TypeError; the client sees the connection dropped)")
def test_the_gcs_lock_is_renewed_by_generation(gcs_bucket: str, gcs_env: GCSServer) -> None:
    out = f"{gcs_bucket}/run"
    fs, root = filesystem(out)
    lease = Lease(fs, f"{root}/.lock", out, lease_s=30)
    lease.acquire()
    try:
        first = lease.version
        lease.renew()
        assert lease.version not in (None, first) and not lease.lost
        assert lease.version == str(fs.info(f"{root}/.lock")["generation"])
    finally:
        lease.release()


@pytest.mark.skip(reason=PRECONDITIONS)
def test_a_second_gcs_writer_is_refused() -> None:
    """Two writers and a stale lease: see tests/test_object_store.py (S3)."""


def test_a_missing_gcs_bucket_is_one_error_line(tiny_model_dir: Path, gcs_env: GCSServer) -> None:
    result = subprocess.run(cli_score("gs://no-such-bucket-pp/run", tiny_model_dir, 3, 3),
                            env=environ_with(gcs_env), capture_output=True, text=True,
                            timeout=600)
    assert_one_error_line(result, "gs://no-such-bucket-pp/run: not found: no such bucket")
