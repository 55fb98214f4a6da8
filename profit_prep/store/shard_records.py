"""Shard records: what a resume checks before it trusts a finished shard (docs/format.md).

Just before a shard's data file appears, ``shards/part-N.json`` records the sha256 and size of
that file, the sha256 of its ``rejected/part-N.jsonl``, its rows, its input digest and the
sha256 of the output's ``run.json``. :class:`ShardRecords` writes that record
(:meth:`~ShardRecords.record`) and judges a finished-looking shard against it
(:meth:`~ShardRecords.verdict`); :class:`profit_prep.store.writer.OutputDir` asks it about
every shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from profit_prep.errors import InputError
from profit_prep.store.names import shard_name
from profit_prep.store.safe_files import lstat_at, open_regular, sha256_bytes, sha256_stream

# What a shard record (shards/part-N.json) must hold.
RECORD_KEYS = ("sha256", "bytes", "rows", "rejected_sha256", "run")

# Why a finished-looking shard is not trusted (:meth:`ShardRecords.problem`); NO_RECORD: an
# older profit-prep wrote it, or something other than a run put it there.
NO_RECORD = "it has no record in shards/ (written by an older profit-prep, or not by this run)"

# Descriptors of OUT ("") and its data/, rejected/, shards/ folders (OutputDir._folders).
Folders = Callable[[], contextlib.AbstractContextManager[dict[str, int]]]


def file_identity(st: os.stat_result | None) -> tuple[int, ...] | None:
    """A file's identity for caching a verdict: any write changes its ctime."""
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ShardRecords:
    """The records of one output's shards, and the verdicts drawn from them (cached while the
    files they were drawn from are unchanged: a run asks about every shard more than once)."""

    def __init__(self, path: Path, folders: Folders) -> None:
        self.path = path
        self.data = path / "data"
        self.rejected = path / "rejected"
        self.records = path / "shards"
        self._folders = folders
        # Shard index -> (file identities, problem or None, record).
        self._verdicts: dict[int, tuple[Any, str | None, dict[str, Any] | None]] = {}
        self._run_digest: tuple[Any, str] | None = None

    def forget(self, index: int | None = None) -> None:
        """Drop the cached verdict of shard ``index`` (of every shard when None)."""
        if index is None:
            self._verdicts.clear()
        else:
            self._verdicts.pop(index, None)

    def record(
        self, data: pa.Buffer, rows: int, rejected_lines: bytes, rejected_rows: int,
        input_digest: str | None, out_fd: int,
    ) -> dict[str, Any]:
        """The record of a shard about to be written: its files' checksums, its rows, its input
        digest and this run's ``run.json``."""
        return {"sha256": sha256_bytes(data), "bytes": data.size, "rows": rows,
                "rejected_sha256": sha256_bytes(rejected_lines), "rejected_rows": rejected_rows,
                "input_digest": input_digest, "run": self.run_json_digest(out_fd)}

    def verdict(self, index: int) -> tuple[str | None, dict[str, Any] | None]:
        """(None, record) for a trusted shard; ("", None) for one not written; else (why it is
        not trusted, record). An untrusted shard is said once, in one line, and scored again."""
        name = shard_name(index)
        try:
            with self._folders() as fds:
                if "data" not in fds or lstat_at(f"{name}.parquet", fds["data"]) is None:
                    return "", None
                key = tuple(file_identity(lstat_at(f, fds[d])) if d in fds else None
                            for d, f in (("data", f"{name}.parquet"), ("rejected", f"{name}.jsonl"),
                                         ("shards", f"{name}.json"), ("", "run.json")))
                cached = self._verdicts.get(index)
                if cached is not None and cached[0] == key:
                    return cached[1], cached[2]
                problem, record = self.problem(name, fds)
        except FileNotFoundError:  # no output yet, or a file went away while it was read
            return "", None
        except InputError as exc:  # a link or special file where a shard's file should be
            problem, record, key = str(exc), None, None
        if problem:
            print(f"note: {self.data / name}.parquet is not trusted ({problem}); scoring that "
                  "shard again", file=sys.stderr)
        if key is not None:
            self._verdicts[index] = (key, problem, record)
        return problem, record

    def problem(
        self, name: str, fds: dict[str, int]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Why the finished-looking shard ``name`` is not the one this run wrote, or None.

        Its record (written just before the data file appeared) must name this run's
        ``run.json`` and the exact bytes of its data and rejected files (sha256): a shard
        copied from another output, replaced, truncated or with its rejected rows gone fails.
        """
        record = self._read_record(name, fds)
        if isinstance(record, str):
            return record, None
        if record["run"] != self.run_json_digest(fds[""]):
            return "its record names another run's run.json", record
        fd = open_regular(f"{name}.parquet", fds["data"], self.data / f"{name}.parquet")
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != record["bytes"]:
                return f"{size} bytes, its record says {record['bytes']}", record
            if sha256_stream(f) != record["sha256"]:
                return "its checksum differs from its record (changed or replaced)", record
        try:
            fd = open_regular(f"{name}.jsonl", fds["rejected"], self.rejected / f"{name}.jsonl")
        except (FileNotFoundError, KeyError):
            return f"rejected/{name}.jsonl is missing", record
        with os.fdopen(fd, "rb") as f:
            if sha256_stream(f) != record["rejected_sha256"]:
                return f"rejected/{name}.jsonl differs from its record", record
        return None, record

    def _read_record(self, name: str, fds: dict[str, int]) -> dict[str, Any] | str:
        """The shard's record, or why there is none to trust."""
        if "shards" not in fds:
            return NO_RECORD
        try:
            fd = open_regular(f"{name}.json", fds["shards"], self.records / f"{name}.json")
        except FileNotFoundError:
            return NO_RECORD
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 16)
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
            return f"its record shards/{name}.json is damaged"
        return record

    def run_json_digest(self, out_fd: int) -> str:
        """The sha256 of ``run.json`` (read again only when the file changed)."""
        fd = open_regular("run.json", out_fd, self.path / "run.json")
        with os.fdopen(fd, "rb") as f:
            key = file_identity(os.fstat(f.fileno()))
            if self._run_digest is None or self._run_digest[0] != key:
                self._run_digest = (key, sha256_stream(f))
        return self._run_digest[1]
