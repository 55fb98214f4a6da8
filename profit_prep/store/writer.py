"""The output directory's writer: atomic shards, resume, a lock, and the manifest written last.

A shard is written to a temporary name and renamed into place, its rejected rows first, so a
visible ``data/part-*.parquet`` always means the whole input range is done. Resume = skip those.
The folder's names are :mod:`profit_prep.store.names`; its reader is
:mod:`profit_prep.store.reader`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from profit_prep.errors import InputError
from profit_prep.store.card import write_card
from profit_prep.store.names import (
    MANIFEST,
    OWN_IN,
    OWN_TEMP,
    REJECTED,
    check_own_folder,
    own_file,
    shard_name,
)
from profit_prep.store.output_base import Output
from profit_prep.store.safe_files import (
    LINK_ERRNOS,
    atomic_file,
    lstat_at,
    not_ours,
    open_folder,
    open_regular,
    os_reason,
    place,
    read_json_object,
    sha256_stream,
)
from profit_prep.store.shard_files import (
    NO_RECORD,
    ManifestTotals,
    record_problem,
    shard_record,
)


def _identity(st: os.stat_result | None) -> tuple[int, ...] | None:
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)



class OutputDir(Output):
    """An output directory being written by one run."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.data = self.path / "data"
        self.rejected = self.path / "rejected"
        self.records = self.path / "shards"
        self._lock_fd: int | None = None
        self._run_digest: tuple[Any, str] | None = None

    @property
    def location(self) -> str:
        """Where another process (Ray's writer actor) reopens this output."""
        return str(self.path.resolve())

    # -- folders ------------------------------------------------------------------------------

    def _open_out(self) -> int:
        # OUT itself may be a link: the user named it (docs/format.md). Nothing inside is.
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @contextlib.contextmanager
    def _folders(self, *, create: bool = False) -> Iterator[dict[str, int]]:
        """Descriptors of OUT ("") and its data/, rejected/, shards/ folders (missing ones are
        left out unless ``create``); links there are refused, never followed."""
        fds: dict[str, int] = {}
        try:
            fds[""] = self._open_out()
            for name in OWN_IN:
                try:
                    fds[name] = open_folder(name, fds[""], self.path / name, create=create)
                except FileNotFoundError:
                    if create:
                        raise
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    # -- lifecycle --------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, params: dict[str, Any], *, overwrite: bool = False) -> Iterator[OutputDir]:
        """Lock the directory and check (or record) the run's parameters.

        ``overwrite`` removes only files profit-prep writes, and only in a directory it
        recognises as its own (``run.json`` or ``manifest.json`` present, nothing else there).
        A link or special file at any of profit-prep's names is refused, with or without it.
        """
        # Before the lock file: never leave one in a foreign folder.
        check_own_folder(self.path, overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            out_fd = self._open_out()
        except OSError as exc:
            raise InputError(f"--out {self.path}: cannot write there ({os_reason(exc)})") from None
        try:
            self._lock_fd = self._lock(out_fd)
        finally:
            os.close(out_fd)
        try:
            # Again under the lock: another run may have written meanwhile.
            check_own_folder(self.path, overwrite)
            self._prepare(params, overwrite)
            yield self
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self, out_fd: int) -> int:
        """Open and flock ``.lock``: a regular file, never a link, FIFO or device."""
        where = self.path / ".lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(".lock", flags | os.O_NOCTTY, 0o666, dir_fd=out_fd)
        except OSError as exc:
            st = lstat_at(".lock", out_fd) if exc.errno in LINK_ERRNOS else None
            if st is not None:
                raise not_ours(where, st.st_mode) from None
            raise InputError(f"--out {self.path}: cannot write there ({os_reason(exc)})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise not_ours(where, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.path}: another run is writing here (lock held)") from None
        return fd

    def check_writable(self, overwrite: bool) -> None:
        """Fail now, before a model loads, if ``open`` would refuse this folder."""
        check_own_folder(self.path, overwrite)

    def _prepare(self, params: dict[str, Any], overwrite: bool) -> None:
        run_file = self.path / "run.json"
        if overwrite:
            self._remove(lambda folder, name: own_file(folder, name) and name != ".lock")
        elif run_file.exists():
            previous = read_json_object(
                run_file, "the run's parameters", "use --overwrite to start this output again"
            )
            self._remove(lambda folder, name: bool(OWN_TEMP.fullmatch(name)))
            if previous != params:
                changed = sorted(
                    k for k in set(previous) | set(params) if previous.get(k) != params.get(k)
                )
                raise InputError(
                    f"{self.path} holds a run with other parameters ({', '.join(changed)} "
                    "differ); use another --out, or --overwrite to replace it"
                )
            with self._folders(create=True):  # shards/ is new to outputs of older versions
                return
        elif any(e.name != ".lock" for e in self.path.iterdir()):
            raise InputError(f"{self.path} holds an output without run.json (a damaged run); "
                             "use --overwrite to start it again, or another --out")
        with self._folders(create=True) as fds:
            place(fds[""], "run.json", (json.dumps(params, indent=2) + "\n").encode(), run_file)
        self._verdicts.clear()

    def _remove(self, own: Any) -> None:
        """Delete the regular files ``own(folder, name)`` accepts, in OUT and its folders, by
        descriptor: never a link, never through one (a linked folder is not entered)."""
        with self._folders() as fds:
            for folder, fd in fds.items():
                for name in sorted(os.listdir(fd)):
                    st = lstat_at(name, fd)
                    if st is not None and stat.S_ISREG(st.st_mode) and own(folder or None, name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=fd)

    # -- shards -----------------------------------------------------------------------------

    def _verdict(self, index: int) -> tuple[str | None, dict[str, Any] | None]:
        """(None, record) for a trusted shard; ("", None) for one not written; else (why it is
        not trusted, record). An untrusted shard is said once, in one line, and scored again."""
        name = shard_name(index)
        try:
            with self._folders() as fds:
                if "data" not in fds or lstat_at(f"{name}.parquet", fds["data"]) is None:
                    return "", None
                key = tuple(_identity(lstat_at(f, fds[d])) if d in fds else None
                            for d, f in (("data", f"{name}.parquet"), ("rejected", f"{name}.jsonl"),
                                         ("shards", f"{name}.json"), ("", "run.json")))
                cached = self._verdicts.get(index)
                if cached is not None and cached[0] == key:
                    return cached[1], cached[2]
                problem, record = self._shard_problem(name, fds)
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

    def _shard_problem(
        self, name: str, fds: dict[str, int]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Why the finished-looking shard ``name`` is not the one this run wrote, or None.

        Its record (written just before the data file appeared) must name this run's
        ``run.json`` and the exact bytes of its data and rejected files (sha256): a shard
        copied from another output, replaced, truncated or with its rejected rows gone fails.
        """
        if "shards" not in fds:
            return NO_RECORD, None
        try:
            fd = open_regular(f"{name}.json", fds["shards"], self.records / f"{name}.json")
        except FileNotFoundError:
            return NO_RECORD, None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 16)
        problem, record = record_problem(name, raw, self._run_json_digest(fds[""]))
        if problem or record is None:
            return problem, record
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

    def _run_json_digest(self, out_fd: int) -> str:
        fd = open_regular("run.json", out_fd, self.path / "run.json")
        with os.fdopen(fd, "rb") as f:
            key = _identity(os.fstat(f.fileno()))
            if self._run_digest is None or self._run_digest[0] != key:
                self._run_digest = (key, sha256_stream(f))
        return self._run_digest[1]

    def _place_shard(self, name: str, data: pa.Buffer, lines: bytes, rows: int,
                     rejected_rows: int, input_digest: str | None) -> None:
        with self._folders(create=True) as fds:
            record = shard_record(data, lines, rows, rejected_rows, input_digest,
                                  self._run_json_digest(fds[""]))
            place(fds["rejected"], f"{name}.jsonl", lines, self.rejected / f"{name}.jsonl")
            place(fds["shards"], f"{name}.json", (json.dumps(record) + "\n").encode(),
                  self.records / f"{name}.json")
            place(fds["data"], f"{name}.parquet", data, self.data / f"{name}.parquet")

    # -- finish -----------------------------------------------------------------------------

    def finalize(
        self, manifest: dict[str, Any], n_shards: int, end_of_turn_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Gather rejected rows, count, checksum, and write the manifest last.

        With ``end_of_turn_ids``, the counts also say how many response tokens close a turn and
        how many of those the mask dropped (``end_of_turn_tokens``, ``end_of_turn_masked``).
        Then the dataset card, ``README.md`` (:mod:`profit_prep.store.card`).
        Counts come from each shard's footer (:func:`shard_counts`), or its columns for shards
        written without them; the scored rows by input format go to ``render.formats``. Memory
        does not grow with the rows: rejected rows are copied file by file, and the manifest
        lists one entry (~150 bytes) per shard. Every shard is checked against its record
        first: one changed since it was written is refused, and a rerun scores it again.
        """
        totals = ManifestTotals(end_of_turn_ids)
        with self._folders(create=True) as fds, \
                atomic_file(fds[""], REJECTED, self.path / REJECTED) as gathered:
            for index in range(n_shards):
                name, figures, lines = self._finished_shard(index, end_of_turn_ids, fds)
                totals.add(name, figures, lines)
                gathered.write(lines)
        manifest = totals.manifest(manifest)
        with self._folders() as fds:
            place(fds[""], MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(),
                  self.path / MANIFEST)
            # After the manifest: the card describes a finished run (profit_prep.store.card).
            write_card(fds[""], manifest, self.path)
        return manifest

    @contextlib.contextmanager
    def _open_file(self, folder: str, name: str,
                   handle: dict[str, int] | None) -> Iterator[BinaryIO]:
        with contextlib.ExitStack() as stack:
            fds = handle if handle is not None else stack.enter_context(self._folders())
            where = self.path / folder / name
            if folder not in fds:
                raise FileNotFoundError(f"{where} is missing")
            with os.fdopen(open_regular(name, fds[folder], where), "rb") as f:
                yield f

    def _shown(self, folder: str, name: str) -> str:
        return str(self.path / folder / name)



# Names that moved out with the reader, the file primitives and the layout: importable from
# here for one release, with a warning (those this module imports itself resolve as they are).
_MOVED = {**dict.fromkeys(("read_manifest", "verify", "check_shards", "shard_problems",
                           "visible_name"), "store.reader"),
          **dict.fromkeys(("atomic_write_bytes", "atomic_write_json", "temporary_file",
                           "sha256_file"), "store.safe_files"), "foreign_entries": "store.names"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"profit_prep.output.{name} moved to profit_prep.{_MOVED[name]}; the old path "
                  "goes in the next release", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"profit_prep.{_MOVED[name]}"), name)
