"""What the object-store tests (tests/test_object_store.py on S3, tests/test_gcs_store.py on
GCS) share: one scoring config and CLI line, and the comparison of a store's objects with the
files of a local run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from profit_prep import ScoreConfig
from tests.conftest import DEMO_GSM8K


def config(out: str, model: Path, **overrides: object) -> ScoreConfig:
    return ScoreConfig(**{"data": str(DEMO_GSM8K), "out": out, "model": str(model),
                          "prompt_field": "question", "response_field": "answer", "limit": 8,
                          "shard_size": 3, "quiet": True, **overrides})


def cli_score(out: str, model: Path, limit: int, shard_size: int, *extra: str) -> list[str]:
    """``config``'s run as a ``profit-prep score`` command line (for a subprocess)."""
    return [sys.executable, "-m", "profit_prep.cli", "score", "--data", str(DEMO_GSM8K),
            "--out", out, "--model", str(model), "--prompt-field", "question",
            "--response-field", "answer", "--limit", str(limit), "--shard-size",
            str(shard_size), "--quiet", *extra]


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def under(objects: dict[str, bytes], prefix: str) -> dict[str, bytes]:
    """The objects below ``prefix/``, named relative to it."""
    return {k[len(prefix) + 1:]: v for k, v in objects.items() if k.startswith(prefix + "/")}


def bucket_of(url: str) -> str:
    """``s3://bucket`` or ``gs://bucket`` -> ``bucket``."""
    return url.partition("://")[2]


def assert_same_output(remote: dict[str, bytes], local: Path) -> None:
    """Every object a local run writes, byte for byte (the manifest: all but its timings)."""
    mine = local_files(local)
    assert sorted(remote) == sorted(mine)
    for name in mine:
        if name != "manifest.json":  # it holds the run's own timings
            assert remote[name] == mine[name], name
    m_remote, m_local = json.loads(remote["manifest.json"]), json.loads(mine["manifest.json"])
    assert m_remote["counts"] == m_local["counts"] and m_remote["shards"] == m_local["shards"]
