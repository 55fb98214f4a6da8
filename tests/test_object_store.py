"""score --out s3://...: the object-store writer against a real S3-protocol server (moto on
127.0.0.1, tests/s3_server.py): same bytes as a local run, resume after kill -9, the lock and
its lease, --overwrite, and no credential in any object or printed line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from profit_prep import score
from profit_prep.errors import InputError
from profit_prep.store.lease import Lease
from profit_prep.store.urls import filesystem
from tests.conftest import DEMO_GSM8K, assert_one_error_line
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET, S3Server, environ_with
from tests.store_runs import assert_same_output, bucket_of, cli_score, config, local_files, under

OWN = ("run.json", "manifest.json", "rejected.jsonl")


def assert_no_secret(*texts: bytes | str) -> None:
    for text in texts:
        blob = text.encode() if isinstance(text, str) else text
        assert FAKE_SECRET.encode() not in blob
        assert FAKE_KEY_ID.encode() not in blob


@pytest.fixture()
def lease_2s(monkeypatch) -> None:
    """A short lease: a killed run's lock is taken over after 2 s, not 60."""
    monkeypatch.setenv("PROFIT_PREP_LOCK_LEASE_S", "2")


def test_score_to_s3_writes_the_same_bytes_as_a_local_run(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server, capfd
) -> None:
    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=8))
    summary = score(config(f"{s3_bucket}/run", tiny_model_dir, limit=8))
    printed = capfd.readouterr()
    objects = s3_env.objects(bucket_of(s3_bucket))
    remote = under(objects, "run")
    # Every shard's data, rejected rows and record, and run.json: byte for byte.
    assert_same_output(remote, local)
    assert {k for k in remote if k.startswith("data/")} == {
        "data/part-00000.parquet", "data/part-00001.parquet", "data/part-00002.parquet"}
    assert "README.md" in remote  # the dataset card, written after the manifest as in a folder
    assert summary["out"] == f"{s3_bucket}/run" and summary["scored_rows"] == 8
    assert ".lock" not in remote  # released at the end
    assert_no_secret(printed.out, printed.err, *objects.values())


def test_a_rerun_on_s3_resumes_and_refuses_a_changed_input(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    data = tmp_path / "d.jsonl"
    lines = DEMO_GSM8K.read_text().splitlines()[:6]
    data.write_text("\n".join(lines) + "\n")
    out = f"{s3_bucket}/run"
    score(config(out, tiny_model_dir, data=str(data), limit=None))
    fs, root = filesystem(out)
    fs.rm_file(f"{root}/data/part-00001.parquet")  # as if killed before that shard's data
    fs.rm_file(f"{root}/manifest.json")
    summary = score(config(out, tiny_model_dir, data=str(data), limit=None))
    assert summary["resumed_shards"] == 1
    changed = json.loads(lines[0])
    changed["answer"] += " (edited)"
    data.write_text("\n".join([json.dumps(changed), *lines[1:]]) + "\n")
    with pytest.raises(InputError, match="changed since this output was started"):
        score(config(out, tiny_model_dir, data=str(data), limit=None))


def test_a_replaced_shard_on_s3_is_not_trusted_and_scored_again(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server, capfd
) -> None:
    out = f"{s3_bucket}/run"
    score(config(out, tiny_model_dir, limit=6))
    client, bucket = s3_env.client(), bucket_of(s3_bucket)
    before = under(s3_env.objects(bucket), "run")
    swapped = before["data/part-00001.parquet"]  # a whole, valid shard: but not this one
    client.put_object(Bucket=bucket, Key="run/data/part-00000.parquet", Body=swapped)
    client.delete_object(Bucket=bucket, Key="run/manifest.json")
    capfd.readouterr()
    summary = score(config(out, tiny_model_dir, limit=6))
    notes = [line for line in capfd.readouterr().err.splitlines() if "is not trusted" in line]
    assert len(notes) == 1 and "part-00000" in notes[0] and "its record" in notes[0]
    assert summary["resumed_shards"] == 1
    after = under(s3_env.objects(bucket), "run")
    assert after["data/part-00000.parquet"] == before["data/part-00000.parquet"]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_is_byte_identical_to_an_uninterrupted_local_run(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server, lease_2s
) -> None:
    limit, shard_size = 60, 2  # 30 shards: the kill lands well before the end
    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=limit, shard_size=shard_size))
    out = f"{s3_bucket}/run"
    env = environ_with(s3_env)
    proc = subprocess.Popen(cli_score(out, tiny_model_dir, limit, shard_size), env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    client, bucket = s3_env.client(), bucket_of(s3_bucket)
    deadline = time.time() + 300
    # Kill as soon as a second shard's record appears: one shard is done, and the second is
    # caught between its record and its data object (or just after).
    while time.time() < deadline and proc.poll() is None:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="run/shards/")
        if listed.get("KeyCount", 0) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    first_out, first_err = proc.communicate()
    killed = under(s3_env.objects(bucket), "run")
    assert "manifest.json" not in killed and ".lock" in killed  # the killed run's lock stays
    n_done = sum(k.startswith("data/") for k in killed)
    assert 1 <= n_done < limit // shard_size
    rerun = subprocess.run(cli_score(out, tiny_model_dir, limit, shard_size), env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    took_over = [line for line in rerun.stderr.splitlines() if "took over the lock" in line]
    assert len(took_over) == 1 and "pid" in took_over[0]
    objects = s3_env.objects(bucket)
    remote = under(objects, "run")
    mine = local_files(local)
    assert sorted(remote) == sorted(mine)
    for name in mine:
        if name != "manifest.json":
            assert remote[name] == mine[name], name
    manifest = json.loads(remote["manifest.json"])
    assert manifest["run"]["resumed_shards"] >= n_done  # only the missing shards were scored
    assert_no_secret(first_out, first_err, rerun.stdout, rerun.stderr, *objects.values())


def test_overwrite_deletes_only_its_own_objects(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    client, bucket = s3_env.client(), bucket_of(s3_bucket)
    # Beside the output: names that share its prefix as a string, and own names elsewhere.
    siblings = {"run2/data/part-00000.parquet": b"not ours", "run.json": b"{}",
                "runx": b"x", "other/run/manifest.json": b"{}"}
    for key, body in siblings.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    out = f"{s3_bucket}/run"
    score(config(out, tiny_model_dir, limit=6))
    stale = "run/data/part-00009.parquet"  # an own name this run no longer writes
    client.put_object(Bucket=bucket, Key=stale, Body=b"old")
    score(config(out, tiny_model_dir, limit=3, overwrite=True))
    objects = s3_env.objects(bucket)
    assert {k: objects[k] for k in siblings} == siblings
    assert stale not in objects
    assert sorted(k for k in under(objects, "run") if k.startswith("data/")) == [
        "data/part-00000.parquet"]
    # A foreign object inside the output: --overwrite refuses and deletes nothing.
    client.put_object(Bucket=bucket, Key="run/notes.txt", Body=b"mine")
    before = s3_env.objects(bucket)
    with pytest.raises(InputError, match=r"did not write \(notes.txt\)"):
        score(config(out, tiny_model_dir, limit=3, overwrite=True))
    assert s3_env.objects(bucket) == before


def test_unfinished_uploads_a_killed_run_left_are_aborted_others_kept(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    client, bucket = s3_env.client(), bucket_of(s3_bucket)
    out = f"{s3_bucket}/run"
    score(config(out, tiny_model_dir, limit=3))
    scorer = json.loads(client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    ours = client.create_multipart_upload(Bucket=bucket, Key="run/data/part-00007.parquet")
    theirs = client.create_multipart_upload(Bucket=bucket, Key="run/big-upload.bin")
    beside = client.create_multipart_upload(Bucket=bucket, Key="run2/data/part-00000.parquet")
    score(config(out, tiny_model_dir, limit=3))  # a resume (nothing to score) takes the lock
    left = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert ours["UploadId"] not in left
    assert {theirs["UploadId"], beside["UploadId"]} <= left
    # Nothing scored, no model loaded: the manifest still describes the scorer the shards had.
    again = json.loads(client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    assert again["scorer"] == scorer["scorer"] and again["scorer"]["dtype"] == "float32"


def test_a_prefix_holding_foreign_objects_is_refused(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    s3_env.client().put_object(Bucket=bucket_of(s3_bucket), Key="run/data.csv", Body=b"a,b")
    with pytest.raises(InputError, match="holds no profit-prep output"):
        score(config(f"{s3_bucket}/run", tiny_model_dir, limit=3))


def test_a_second_writer_is_refused_naming_the_lock_owner(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    out = f"{s3_bucket}/run"
    fs, root = filesystem(out)
    holder = Lease(fs, f"{root}/.lock", out)  # what a running writer holds (ObjectOutput.open)
    holder.acquire()
    try:
        result = subprocess.run(cli_score(out, tiny_model_dir, 3, 3), env=environ_with(s3_env),
                                capture_output=True, text=True, timeout=600)
    finally:
        holder.release()
    assert_one_error_line(result, "another run is writing here")
    assert f"pid {os.getpid()}" in result.stderr
    assert_no_secret(result.stdout, result.stderr)
    assert ".lock" not in under(s3_env.objects(bucket_of(s3_bucket)), "run")
    assert "run.json" not in under(s3_env.objects(bucket_of(s3_bucket)), "run")


def test_of_racing_writers_exactly_one_takes_the_lock(s3_bucket: str, s3_env: S3Server) -> None:
    fs, root = filesystem(f"{s3_bucket}/run")
    leases = [Lease(fs, f"{root}/.lock", f"{s3_bucket}/run", lease_s=30) for _ in range(8)]
    outcomes: list[str] = []
    start = threading.Barrier(len(leases))

    def take(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes.append("took")
        except InputError as exc:
            outcomes.append("refused" if "another run is writing here" in str(exc) else str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["took"]
    for lease in leases:
        lease.release()
    assert not fs.exists(f"{root}/.lock")


def test_a_stale_lock_is_taken_over_after_its_lease_with_one_line(
    tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server, capfd
) -> None:
    client, bucket = s3_env.client(), bucket_of(s3_bucket)
    stale = {"owner": "gone-host pid 4242", "run": "deadbeef", "host": "gone-host", "pid": 4242,
             "renewed": time.time() - 120, "expires": time.time() - 60, "lease_s": 60}
    client.put_object(Bucket=bucket, Key="run/.lock", Body=json.dumps(stale).encode())
    score(config(f"{s3_bucket}/run", tiny_model_dir, limit=3))
    err = capfd.readouterr().err.splitlines()
    notes = [line for line in err if "took over the lock" in line]
    assert len(notes) == 1 and "gone-host pid 4242" in notes[0] and "deadbeef" in notes[0]
    assert "manifest.json" in under(s3_env.objects(bucket), "run")


def test_a_lock_within_its_lease_is_kept_by_renewal_and_a_lost_one_stops_writes(
    s3_bucket: str, s3_env: S3Server, capfd
) -> None:
    fs, root = filesystem(f"{s3_bucket}/run")
    where = f"{s3_bucket}/run"
    first = Lease(fs, f"{root}/.lock", where, lease_s=1.5)
    first.acquire()
    time.sleep(3.5)  # more than two leases: only renewal keeps it
    with pytest.raises(InputError, match="another run is writing here"):
        Lease(fs, f"{root}/.lock", where, lease_s=1.5).acquire()
    first._stop.set()  # as if its process hung: no more renewals
    first._thread.join()
    time.sleep(2)
    second = Lease(fs, f"{root}/.lock", where, lease_s=30)
    second.acquire()
    assert "took over the lock" in capfd.readouterr().err
    first.renew()
    with pytest.raises(InputError, match="lost its lock"):
        first.check()
    first.release()  # must not delete the new holder's lock
    assert json.loads(fs.cat_file(f"{root}/.lock"))["run"] == second.run_id
    second.release()


def test_credentials_in_the_out_url_are_refused_without_echo(
    tiny_model_dir: Path, s3_env: S3Server
) -> None:
    result = subprocess.run(
        cli_score(f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@bucket/run", tiny_model_dir, 3, 3),
        env=environ_with(s3_env), capture_output=True, text=True, timeout=600)
    assert_one_error_line(result, "embeds credentials")
    assert_no_secret(result.stdout, result.stderr)


def test_a_missing_bucket_is_one_error_line(tiny_model_dir: Path, s3_env: S3Server) -> None:
    result = subprocess.run(cli_score("s3://no-such-bucket-pp/run", tiny_model_dir, 3, 3),
                            env=environ_with(s3_env), capture_output=True, text=True, timeout=600)
    assert_one_error_line(result, "s3://no-such-bucket-pp/run")
    assert_no_secret(result.stdout, result.stderr)


def test_the_hub_is_refused_as_an_output(tiny_model_dir: Path) -> None:
    with pytest.raises(InputError, match="hf upload"):
        score(config("hf://datasets/someone/masks", tiny_model_dir, limit=3))


@pytest.mark.slow
def test_a_ray_run_to_s3_writes_the_same_bytes_from_the_drivers_node(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: str, s3_env: S3Server
) -> None:
    ray = pytest.importorskip("ray")
    from profit_prep.executors.ray import score_with_ray

    local = tmp_path / "local"
    score(config(str(local), tiny_model_dir, limit=8))
    assert not ray.is_initialized()
    # A local cluster started here: its workers inherit this environment (the test server's
    # endpoint and fake keys), as a cluster node's workers get the node's credential chain.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        score_with_ray(config(f"{s3_bucket}/run", tiny_model_dir, limit=8, num_workers=1))
    finally:
        ray.shutdown()
    remote = under(s3_env.objects(bucket_of(s3_bucket)), "run")
    mine = local_files(local)
    assert sorted(remote) == sorted(mine)
    # Shard data and rejected rows byte for byte (run.json records the Ray run's own choices,
    # so the records naming it differ).
    shards = [n for n in mine if n.startswith(("data/", "rejected"))]
    assert len(shards) == 7
    for name in shards:
        assert remote[name] == mine[name], name
