"""Reading outputs on an object store (profit_prep.store.cache) against a real S3-protocol server
on loopback: load, verify, stats, inspect, report and combine give what they give locally,
through a cache verified against the manifest's checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profit_prep import load
from profit_prep.cli import main
from profit_prep.errors import InputError
from profit_prep.store import cache
from profit_prep.store.reader import verify
from tests.conftest import score_demo
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir: Path) -> Path:
    return score_demo(tmp_path_factory.mktemp("scored") / "out", tiny_model_dir, limit=8)


@pytest.fixture(autouse=True)
def _private_caches(scored: Path, tmp_path_factory, monkeypatch, private_datasets_cache) -> None:
    monkeypatch.setenv("PROFIT_PREP_CACHE", str(tmp_path_factory.mktemp("cache")))


def _upload(server, url: str, out: Path) -> str:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            key = f"{prefix}/{f.relative_to(out).as_posix()}".lstrip("/")
            server.client().put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
    return url


def _rows(ds) -> str:
    return json.dumps(ds.to_list(), allow_nan=True)


def _fetches(monkeypatch) -> list[str]:
    names: list[str] = []
    real = cache._fetch
    monkeypatch.setattr(cache, "_fetch", lambda *a: names.append(a[3]) or real(*a))
    return names


def test_load_from_the_store_is_the_local_load(scored: Path, s3_bucket: str, s3_env,
                                               monkeypatch) -> None:
    url = _upload(s3_env, f"{s3_bucket}/runs/a", scored)
    fetched = _fetches(monkeypatch)
    for kwargs in ({}, {"tau": 0.3, "labels": True}):
        assert _rows(load(url, **kwargs)) == _rows(load(scored, **kwargs))
    shards = [f"data/part-0000{i}.parquet" for i in range(3)]
    assert [n for n in fetched if n.startswith("data/")] == shards  # once, then reused
    local = cache.local_output(url)
    assert sorted(p.name for p in (local / "data").iterdir()) == [Path(s).name for s in shards]
    assert s3_bucket[5:] not in str(local) and "runs" not in str(local)  # hashed keys only
    # A cached shard that no longer matches its checksum is fetched again.
    (local / shards[1]).write_bytes(b"PAR1 not this")
    assert _rows(load(url)) == _rows(load(scored))
    assert [n for n in fetched if n.startswith("data/")] == [*shards, shards[1]]
    for f in cache._cache_root().rglob("*"):
        if f.is_file():
            assert FAKE_SECRET.encode() not in f.read_bytes()


def test_a_changed_store_is_refused_and_verify_lists_it(scored: Path, s3_bucket: str, s3_env,
                                                        capsys) -> None:
    url = _upload(s3_env, f"{s3_bucket}/run", scored)
    assert verify(url) == []
    assert main(["verify", url]) == 0 and capsys.readouterr().out.strip() == "ok"
    load(url)  # cached
    bucket = s3_bucket[5:]
    client = s3_env.client()
    other = (scored / "data" / "part-00000.parquet").read_bytes()
    client.put_object(Bucket=bucket, Key="run/data/part-00001.parquet", Body=other)
    client.delete_object(Bucket=bucket, Key="run/data/part-00002.parquet")
    client.put_object(Bucket=bucket, Key="run/data/stray.parquet", Body=other)
    problems = verify(url)
    assert problems == [
        "data/part-00001.parquet: checksum differs from the manifest (changed, replaced or "
        "truncated)",
        "data/part-00002.parquet: missing",
        "data/stray.parquet: not in the manifest (readers of data/ would read it too)",
    ]
    with pytest.raises(InputError, match=f"{url}: damaged output: data/part-00001.parquet"):
        load(url)  # the cached copies are good, but the store no longer holds that output
    assert main(["stats", url]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "damaged output" in err
    # The store restored: readable again, from the cache where the files did not change.
    _upload(s3_env, url, scored)
    client.delete_object(Bucket=bucket, Key="run/data/stray.parquet")
    assert verify(url) == [] and _rows(load(url)) == _rows(load(scored))


def test_unfinished_or_absent_outputs_on_the_store(scored: Path, s3_bucket: str, s3_env) -> None:
    with pytest.raises(InputError, match="not a profit-prep output"):
        load(f"{s3_bucket}/nothing")
    s3_env.client().put_object(Bucket=s3_bucket[5:], Key="half/run.json",
                               Body=(scored / "run.json").read_bytes())
    with pytest.raises(InputError, match="has not finished"):
        verify(f"{s3_bucket}/half")
    s3_env.client().put_object(Bucket=s3_bucket[5:], Key="bad/manifest.json", Body=b"{\"shards")
    with pytest.raises(InputError, match="manifest.json is damaged"):
        load(f"{s3_bucket}/bad")


def test_views_and_combine_read_the_store(scored: Path, s3_bucket: str, s3_env, tmp_path: Path,
                                          capsys) -> None:
    url = _upload(s3_env, f"{s3_bucket}/run", scored)
    outputs = {}
    for where in (str(scored), url):
        assert main(["stats", where, "--json", "--tau", "0.3"]) == 0
        stats = capsys.readouterr().out
        assert main(["inspect", where, "--limit", "2", "--color", "never"]) == 0
        shown = capsys.readouterr().out
        html = tmp_path / f"{len(outputs)}.html"
        assert main(["report", where, "--html", str(html), "--examples", "3"]) == 0
        capsys.readouterr()
        into = tmp_path / f"combined-{len(outputs)}"
        assert main(["combine", where, "--reference", where, "--into", str(into)]) == 0
        capsys.readouterr()
        outputs[where] = (stats, shown, html.stat().st_size > 0,
                          [p.read_bytes() for p in sorted((into / "data").iterdir())])
    assert outputs[str(scored)] == outputs[url]
    assert main(["report", url, "--examples", "2"]) == 0  # default: beside the cached copy
    line = capsys.readouterr().out
    assert str(cache._cache_root()) in line and FAKE_SECRET not in line


def test_credentials_never_reach_keys_or_lines(scored: Path, s3_bucket: str, s3_env,
                                               capsys) -> None:
    url = f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@{s3_bucket[5:]}/run"
    for argv in (["verify", url], ["stats", url], ["inspect", url], ["report", url]):
        assert main(argv) == 2
        printed = capsys.readouterr()
        assert "embeds credentials" in printed.err
        assert FAKE_SECRET not in printed.out + printed.err
        assert FAKE_KEY_ID not in printed.out + printed.err
    with pytest.raises(InputError) as exc:
        load(url)
    assert FAKE_SECRET not in str(exc.value)
    # The store's own errors (a bucket that does not exist, a wrong secret) are one line too,
    # and the secret of the environment's credentials is in none of them.
    for argv in (["verify", "s3://pp-no-such-bucket-0/run"], ["stats", f"{s3_bucket}/none"]):
        assert main(argv) == 2
        printed = capsys.readouterr()
        assert printed.err.count("error:") == 1 and "Traceback" not in printed.err
        assert FAKE_SECRET not in printed.out + printed.err
    assert not cache._cache_root().exists() or not any(cache._cache_root().iterdir())


def test_scored_to_the_store_then_read_from_it(scored: Path, s3_bucket: str, s3_env,
                                               tiny_model_dir: Path, tmp_path: Path) -> None:
    """The object-store writer's output, read back: the same Dataset as the local run's."""
    url = f"{s3_bucket}/scored"
    score_demo(url, tiny_model_dir, limit=8)  # written by profit_prep.store.objects
    assert verify(url) == []
    assert _rows(load(url, labels=True)) == _rows(load(scored, labels=True))
    local = cache.local_output(url)
    for shard in json.loads((scored / "manifest.json").read_text())["shards"]:
        assert (local / shard["file"]).read_bytes() == (scored / shard["file"]).read_bytes()


def test_a_new_manifest_keeps_the_cached_shards(scored: Path, s3_bucket: str, s3_env,
                                                monkeypatch) -> None:
    """A new manifest (a resumed or extended run) is a new cache folder: the shards it still
    names move over from the old one, verified, instead of being fetched again."""
    url = _upload(s3_env, f"{s3_bucket}/run", scored)
    fetched = _fetches(monkeypatch)
    first = cache.local_output(url)
    manifest = json.loads((scored / "manifest.json").read_text())
    manifest["run"]["wall_s"] += 1.0  # another manifest naming the same shards
    s3_env.client().put_object(Bucket=s3_bucket[5:], Key="run/manifest.json",
                               Body=json.dumps(manifest).encode())
    second = cache.local_output(url)
    assert second != first and not first.exists() and second.parent == first.parent
    assert [n for n in fetched if n.startswith("data/")] == [s["file"] for s in
                                                            manifest["shards"]]
    assert _rows(load(url)) == _rows(load(scored))
