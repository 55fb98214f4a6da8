"""The output directory: atomic shards, resume, a lock, and the manifest written last.

Layout::

    OUT/
      run.json               parameters of the run (a rerun must match them, or --overwrite)
      .lock                  held while a run writes; a second run is refused
      data/part-00000.parquet  rows whose source_index is in [0, shard_size)
      data/part-00001.parquet  ... one file per input range, even when every row was rejected
      rejected/part-00000.jsonl  rejected rows of that range (example_id, source_index, reason)
      rejected.jsonl         all rejected rows, gathered at the end
      manifest.json          written last: counts, per-shard row counts and checksums

A shard is written to a temporary name and renamed into place, its rejected rows first, so a
visible ``data/part-*.parquet`` always means the whole input range is done. Resume = skip those.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - registers pa.compute
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.format import FORMAT_VERSION, SCHEMA, flat_list
from profit_prep.masks import end_of_turn_tokens

MANIFEST = "manifest.json"
# Per-row stat column -> the manifest count that sums it.
_SUMMED = {
    "n_tokens": "tokens",
    "n_response": "response_tokens",
    "n_kept": "kept_tokens",
    "truncated": "truncated_rows",
}
REJECTED = "rejected.jsonl"
# Parquet footer key of a shard: the hash of the input rows it was made from.
INPUT_DIGEST_KEY = b"profit_prep.input_digest"
# Parquet footer key of a shard: its counts (JSON), so finalize reads footers, not columns.
SHARD_COUNTS_KEY = b"profit_prep.counts"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (os.umask can only be read by setting it, which is not thread-safe later).
_UMASK = _current_umask()


def temporary_file(folder: Path, name: str) -> tuple[int, str]:
    """A temporary file beside ``folder/name`` with ordinary permissions (``mkstemp``'s are 0600).

    Output files follow the umask like any other file a user creates, so a teammate or a
    training job under another user can read a shared output.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


# -- file system primitives: no links followed inside OUT, one atomic write -----------------------

# Inside OUT nothing is opened through a link: folders and files are opened relative to their
# folder's descriptor with O_NOFOLLOW, so a link planted at one of profit-prep's names (data/,
# .lock, a shard) is refused instead of written, locked or deleted through. OUT itself may be a
# link: the user named it.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def kind_of(mode: int) -> str:
    """What a file system entry is, as an error message says it."""
    for test, kind in ((stat.S_ISLNK, "a link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def not_ours(where: Path, mode: int, wanted: str = "a file") -> InputError:
    return InputError(
        f"{where} is {kind_of(mode)}, not {wanted} profit-prep made; it never writes, locks or "
        "deletes through links or special files: move it away and rerun"
    )


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def open_folder(name: str, dir_fd: int, where: Path, *, create: bool = False) -> int:
    """A descriptor of the folder ``name`` in ``dir_fd`` (made when ``create``); a link or a
    file there is refused with one line, never followed."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        st = _lstat(name, dir_fd) if exc.errno in _LINK_ERRNOS else None
        if st is not None:
            raise not_ours(where, st.st_mode, "a folder") from None
        raise


def open_regular(name: str, dir_fd: int, where: Path) -> int:
    """A read descriptor of the regular file ``name`` in ``dir_fd``; a link, FIFO or device is
    refused (never followed, never blocked on). FileNotFoundError when absent."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        st = _lstat(name, dir_fd) if exc.errno in _LINK_ERRNOS else None
        if st is not None:
            raise not_ours(where, st.st_mode) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_ours(where, mode)
    return fd


def _check_replaceable(name: str, dir_fd: int, where: Path) -> None:
    """Only a regular file (or nothing) may be replaced: never a link, folder or device."""
    st = _lstat(name, dir_fd)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise not_ours(where, st.st_mode)


@contextlib.contextmanager
def atomic_file(dir_fd: int, name: str, where: Path) -> Iterator[BinaryIO]:
    """The one way profit-prep writes a file: a new temporary beside it (``.NAME.XXXXXXXX``,
    created exclusively, never through a link, mode 0666 less the umask), fsynced, then renamed
    over ``name`` in the same folder, which must be a regular file or absent. Readers see
    nothing or all of it; on any error the temporary is removed."""
    _check_replaceable(name, dir_fd, where)
    while True:
        tmp = f".{name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, _NEW_FLAGS, 0o666, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _check_replaceable(name, dir_fd, where)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)  # the rename itself survives a crash


def place(dir_fd: int, name: str, data: bytes | memoryview | pa.Buffer, where: Path) -> None:
    """Write ``data`` as ``name`` in ``dir_fd`` atomically (:func:`atomic_file`)."""
    with atomic_file(dir_fd, name, where) as f:
        f.write(data)


def _open_folder_of(path: Path) -> int:
    """A descriptor of ``path``'s parent (made if missing); the user named it, links and all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it (never through a link at
    ``path`` itself: a link, folder or device there is refused)."""
    dir_fd = _open_folder_of(Path(path))
    try:
        place(dir_fd, Path(path).name, data, Path(path))
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_user_file(path: str | Path, data: bytes) -> bool:
    """Write ``data`` to a path the user named (``report --html FILE``); True when streamed.

    A missing path or a regular file is written atomically (:func:`atomic_file`). A link, a
    FIFO or a character device is written *through* as a stream and never replaced:
    ``/dev/stdout`` (the process's own stdout or stderr is written on its descriptor, keeping
    the shell's append or pipe), a FIFO, a link to a file (truncated and rewritten, as ``>``
    would). A folder, socket, block device or a link to nothing is refused with one line.
    """
    path = Path(path)
    if not writes_through(path):
        atomic_write_bytes(path, data)
        return False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path} is a link to a missing file; name a file to write") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise InputError(f"{path} is {kind_of(st.st_mode)}: profit-prep writes a file, a link "
                         "to one, a FIFO or a character device; name a file")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    for own in (1, 2):  # /dev/stdout, /dev/stderr: keep the shell's mode (append, pipe)
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(own)):
                _write_all(own, data)
                return True
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_TRUNC if stat.S_ISREG(st.st_mode)
                                                         else 0)
    fd = os.open(path, flags)  # no O_CREAT: nothing is made at the end of a link
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return True


def writes_through(path: str | Path) -> bool:
    """Whether :func:`write_user_file` streams to ``path`` (a link or special file there)
    rather than replacing it atomically."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return "sha256:" + digest.hexdigest()


def _sha256_bytes(data: bytes | memoryview | pa.Buffer) -> str:
    return "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


# What profit-prep writes into an output folder (and so the only things --overwrite removes).
_OWN_TOP = {"run.json", MANIFEST, ".lock", REJECTED, "report.html"}
_OWN_IN = {"data": re.compile(r"part-\d{5}\.parquet"), "rejected": re.compile(r"part-\d{5}\.jsonl"),
           "shards": re.compile(r"part-\d{5}\.json")}
# Temporaries of atomic writes (8 random characters after the name).
_OWN_TEMP = re.compile(r"\.(run\.json|manifest\.json|rejected\.jsonl|report\.html|"
                       r"part-\d{5}\.(parquet|jsonl|json))\.[A-Za-z0-9_]{8}")
# What a shard record (shards/part-N.json) holds.
_RECORD_KEYS = ("sha256", "bytes", "rows", "rejected_sha256", "run")


def _own_file(folder: str | None, name: str) -> bool:
    if _OWN_TEMP.fullmatch(name):
        return True
    if folder is None:
        return name in _OWN_TOP
    return bool(_OWN_IN[folder].fullmatch(name))


def foreign_entries(path: Path) -> list[Path]:
    """Everything in an output folder that profit-prep does not write (links count as foreign)."""
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name in _OWN_IN and entry.is_dir() and not entry.is_symlink():
            foreign += [f for f in sorted(entry.iterdir())
                        if f.is_symlink() or not f.is_file() or not _own_file(entry.name, f.name)]
        elif entry.is_symlink() or not entry.is_file() or not _own_file(None, entry.name):
            foreign.append(entry)
    return foreign


def unsafe_entries(path: Path) -> list[tuple[Path, int]]:
    """Entries at profit-prep's own names that it must not write, lock or delete: a link, or
    the wrong kind (a FIFO named ``.lock``, a file named ``data``). With their ``st_mode``."""
    unsafe = []
    for entry in sorted(path.iterdir()):
        mode = entry.lstat().st_mode
        if entry.name in _OWN_IN:
            if not stat.S_ISDIR(mode):
                unsafe.append((entry, mode))
                continue
            for f in sorted(entry.iterdir()):
                inner = f.lstat().st_mode
                if _own_file(entry.name, f.name) and not stat.S_ISREG(inner):
                    unsafe.append((f, inner))
        elif _own_file(None, entry.name) and not stat.S_ISREG(mode):
            unsafe.append((entry, mode))
    return unsafe


def os_reason(exc: OSError) -> str:
    """An OSError as a person reads it: 'No space left on device: /out/data'."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


def read_json_object(path: Path, what: str, remedy: str) -> dict[str, Any]:
    """A JSON object from ``path``, or one clear error naming the file, the fault and a remedy."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is damaged ({what}: {reason}); {remedy}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} is damaged ({what} is not a JSON object); {remedy}")
    return obj


def _end_of_turn_counts(
    source: Path | BinaryIO | pa.Table, end_of_turn_ids: Sequence[int]
) -> tuple[int, int]:
    """Response tokens of a shard that close a turn, and how many of them are masked."""
    columns = ["input_ids", "response_mask", "loss_mask"]
    table = source if isinstance(source, pa.Table) else pq.read_table(source, columns=columns)
    ids, _ = flat_list(table["input_ids"])
    response, _ = flat_list(table["response_mask"])
    kept, _ = flat_list(table["loss_mask"])
    end = end_of_turn_tokens(ids, response, list(end_of_turn_ids))
    return int(end.sum()), int((end & ~kept).sum())


def shard_counts(
    table: pa.Table,
    end_of_turn_ids: Sequence[int] | None = None,
    formats: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """What :meth:`OutputDir.finalize` sums over shards, counted from a shard's table: the
    per-row stat columns, the end-of-turn tokens for ``end_of_turn_ids`` (with the ids, so a
    count made for other ids is never used), and scored rows by input format."""
    counts: dict[str, Any] = {
        key: int(pa.compute.sum(table[column]).as_py() or 0) for column, key in _SUMMED.items()
    }
    if end_of_turn_ids is not None:
        total, masked = _end_of_turn_counts(table, end_of_turn_ids)
        counts["end_of_turn"] = {"ids": [int(i) for i in end_of_turn_ids], "tokens": total,
                                 "masked": masked}
    if formats is not None:
        counts["formats"] = dict(sorted(Counter(f for f in formats if f).items()))
    return counts


def _stored_counts(meta: pq.FileMetaData) -> dict[str, Any] | None:
    """The counts a shard's footer holds (None for shards written before they were kept)."""
    raw = (meta.schema.to_arrow_schema().metadata or {}).get(SHARD_COUNTS_KEY)
    if not raw:
        return None
    try:
        counts = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in _SUMMED.values())
    return counts if ok else None


# Why a finished-looking shard is not trusted (``_shard_problem``); NO_RECORD: an older
# profit-prep wrote it, or something other than a run put it there.
NO_RECORD = "it has no record in shards/ (written by an older profit-prep, or not by this run)"


def _identity(st: os.stat_result | None) -> tuple[int, ...] | None:
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class OutputDir:
    """An output directory being written by one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = self.path / "data"
        self.rejected = self.path / "rejected"
        self.records = self.path / "shards"
        self._lock_fd: int | None = None
        # Shard index -> (file identities, problem or None, record): a verdict is reused while
        # the files are unchanged (all_done and pending ask about every shard).
        self._verdicts: dict[int, tuple[Any, str | None, dict[str, Any] | None]] = {}
        self._run_digest: tuple[Any, str] | None = None

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
            for name in _OWN_IN:
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
        self._check_own(overwrite)  # before the lock file: never leave one in a foreign folder
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
            self._check_own(overwrite)  # again under the lock: another run may have written
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
            st = _lstat(".lock", out_fd) if exc.errno in _LINK_ERRNOS else None
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
        self._check_own(overwrite)

    def all_done(self, n_shards: int) -> bool:
        return all(self.shard_done(i) for i in range(n_shards))

    def _check_own(self, overwrite: bool) -> None:
        """Refuse an ``--out`` that is a file, or a folder holding anything profit-prep did not
        write (with ``--overwrite`` too: it would delete the user's files), or a link or special
        file at one of profit-prep's own names (always: it would write or delete through it)."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} is a file, not a directory; choose a folder")
        if not self.path.is_dir():
            return
        entries = list(self.path.iterdir())
        unsafe = unsafe_entries(self.path)
        if unsafe:
            where, mode = unsafe[0]
            more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
            wanted = "a folder" if where.name in _OWN_IN and where.parent == self.path else "a file"
            raise InputError(str(not_ours(where, mode, wanted)) + more)
        foreign = foreign_entries(self.path)
        marked = (self.path / "run.json").exists() or (self.path / MANIFEST).exists()
        if not marked and any(e.name != ".lock" for e in entries):
            raise InputError(
                f"{self.path} is not empty and holds no profit-prep output (no run.json); "
                "profit-prep writes only into a new or empty folder: choose another --out"
            )
        if foreign and overwrite:
            shown = ", ".join(str(f.relative_to(self.path)) for f in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise InputError(
                f"{self.path} holds files profit-prep did not write ({shown}{more}); "
                "--overwrite removes only its own files: move those, or choose another --out"
            )

    def _prepare(self, params: dict[str, Any], overwrite: bool) -> None:
        run_file = self.path / "run.json"
        if overwrite:
            self._remove(lambda folder, name: _own_file(folder, name) and name != ".lock")
        elif run_file.exists():
            previous = read_json_object(
                run_file, "the run's parameters", "use --overwrite to start this output again"
            )
            self._remove(lambda folder, name: bool(_OWN_TEMP.fullmatch(name)))
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
                    st = _lstat(name, fd)
                    if st is not None and stat.S_ISREG(st.st_mode) and own(folder or None, name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=fd)

    # -- shards -----------------------------------------------------------------------------

    def shard_done(self, index: int) -> bool:
        """True when shard ``index`` is finished and trusted (:meth:`_shard_problem`)."""
        return self._verdict(index)[0] is None

    def _verdict(self, index: int) -> tuple[str | None, dict[str, Any] | None]:
        """(None, record) for a trusted shard; ("", None) for one not written; else (why it is
        not trusted, record). An untrusted shard is said once, in one line, and scored again."""
        name = shard_name(index)
        try:
            with self._folders() as fds:
                if "data" not in fds or _lstat(f"{name}.parquet", fds["data"]) is None:
                    return "", None
                key = tuple(_identity(_lstat(f, fds[d])) if d in fds else None
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
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
            return f"its record shards/{name}.json is damaged", None
        if record["run"] != self._run_json_digest(fds[""]):
            return "its record names another run's run.json", record
        fd = open_regular(f"{name}.parquet", fds["data"], self.data / f"{name}.parquet")
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != record["bytes"]:
                return f"{size} bytes, its record says {record['bytes']}", record
            if _sha256_stream(f) != record["sha256"]:
                return "its checksum differs from its record (changed or replaced)", record
        try:
            fd = open_regular(f"{name}.jsonl", fds["rejected"], self.rejected / f"{name}.jsonl")
        except (FileNotFoundError, KeyError):
            return f"rejected/{name}.jsonl is missing", record
        with os.fdopen(fd, "rb") as f:
            if _sha256_stream(f) != record["rejected_sha256"]:
                return f"rejected/{name}.jsonl differs from its record", record
        return None, record

    def _run_json_digest(self, out_fd: int) -> str:
        fd = open_regular("run.json", out_fd, self.path / "run.json")
        with os.fdopen(fd, "rb") as f:
            key = _identity(os.fstat(f.fileno()))
            if self._run_digest is None or self._run_digest[0] != key:
                self._run_digest = (key, _sha256_stream(f))
        return self._run_digest[1]

    def input_digest(self, index: int) -> str | None:
        """The input digest stored with a finished shard (None for outputs that predate it)."""
        problem, record = self._verdict(index)
        if problem is None and record is not None and "input_digest" in record:
            return record["input_digest"]
        path = self.data / f"{shard_name(index)}.parquet"
        try:
            metadata = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path} is damaged ({str(exc).splitlines()[0]}); "
                             "delete it and rerun to score that shard again") from None
        value = metadata.get(INPUT_DIGEST_KEY)
        return value.decode() if value else None

    def write_shard(
        self,
        index: int,
        table: pa.Table,
        rejected: list[dict[str, Any]],
        input_digest: str | None = None,
        end_of_turn_ids: Sequence[int] | None = None,
        formats: Sequence[str | None] | None = None,
    ) -> None:
        """Write one shard: its rejected rows, its record, then its data (which marks it done).

        ``input_digest`` (a hash of the shard's input rows) goes into the Parquet footer, so a
        resumed run can tell whether the input changed since (docs/format.md). So do the
        shard's counts (:func:`shard_counts`; ``formats``: each scored row's input format), so
        that :meth:`finalize` reads footers only, however large the output. The record
        (``shards/part-N.json``: checksums of both files, rows, this run's ``run.json``) is
        what a resume checks before it trusts the shard.
        """
        metadata = dict(table.schema.metadata or {})
        if input_digest is not None:
            metadata[INPUT_DIGEST_KEY] = input_digest.encode()
        counts = shard_counts(table, end_of_turn_ids, formats)
        metadata[SHARD_COUNTS_KEY] = json.dumps(counts, separators=(",", ":")).encode()
        table = table.replace_schema_metadata(metadata)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode()
        # Float columns (logprobs and any later signal) compress ~1.6x better split by byte
        # plane; dictionary encoding would take precedence over that, so it is kept for the id
        # column alone. Measured on GSM8K: 6.3 -> 4.7 bytes per token. Written to memory first
        # (a few MB per shard) so its checksum is known before the file appears.
        floats = [f.name for f in table.schema
                  if pa.types.is_floating(getattr(f.type, "value_type", f.type))]
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", use_dictionary=["example_id"],
                       use_byte_stream_split=floats)
        data = sink.getvalue()
        name = shard_name(index)
        with self._folders(create=True) as fds:
            record = {"sha256": _sha256_bytes(data), "bytes": data.size, "rows": table.num_rows,
                      "rejected_sha256": _sha256_bytes(lines), "rejected_rows": len(rejected),
                      "input_digest": input_digest, "run": self._run_json_digest(fds[""])}
            place(fds["rejected"], f"{name}.jsonl", lines, self.rejected / f"{name}.jsonl")
            place(fds["shards"], f"{name}.json", (json.dumps(record) + "\n").encode(),
                  self.records / f"{name}.json")
            place(fds["data"], f"{name}.parquet", data, self.data / f"{name}.parquet")
        self._verdicts.pop(index, None)

    # -- finish -----------------------------------------------------------------------------

    def finalize(
        self, manifest: dict[str, Any], n_shards: int, end_of_turn_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Gather rejected rows, count, checksum, and write the manifest last.

        With ``end_of_turn_ids``, the counts also say how many response tokens close a turn and
        how many of those the mask dropped (``end_of_turn_tokens``, ``end_of_turn_masked``).
        Counts come from each shard's footer (:func:`shard_counts`), or its columns for shards
        written without them; the scored rows by input format go to ``render.formats``. Memory
        does not grow with the rows: rejected rows are copied file by file, and the manifest
        lists one entry (~150 bytes) per shard. Every shard is checked against its record
        first: one changed since it was written is refused, and a rerun scores it again.
        """
        shards: list[dict[str, Any]] = []
        counts = dict.fromkeys(["scored_rows", *_SUMMED.values()], 0)
        if end_of_turn_ids is not None:
            counts.update(end_of_turn_tokens=0, end_of_turn_masked=0)
        formats: Counter[str] | None = Counter()
        n_rejected = 0
        with self._folders(create=True) as fds, \
                atomic_file(fds[""], REJECTED, self.path / REJECTED) as gathered:
            for index in range(n_shards):
                name = shard_name(index)
                problem, record = self._verdict(index)
                if problem not in (None, NO_RECORD):  # NO_RECORD: shards of older versions
                    raise InputError(
                        f"{self.data / name}.parquet: {problem or 'missing'}; rerun the same "
                        "command: it scores that shard again (finished shards are kept)")
                where = self.data / f"{name}.parquet"
                with os.fdopen(open_regular(f"{name}.parquet", fds["data"], where), "rb") as f:
                    meta = pq.read_metadata(f)
                    stored = _stored_counts(meta)
                    if stored is None:  # a shard from before counts were kept in footers
                        f.seek(0)
                        stored = shard_counts(pq.read_table(f, columns=list(_SUMMED)))
                    if end_of_turn_ids is not None:
                        eot = stored.get("end_of_turn") or {}
                        if eot.get("ids") == list(end_of_turn_ids):
                            total, masked = int(eot["tokens"]), int(eot["masked"])
                        else:
                            f.seek(0)
                            total, masked = _end_of_turn_counts(f, end_of_turn_ids)
                        counts["end_of_turn_tokens"] += total
                        counts["end_of_turn_masked"] += masked
                    if record is None:
                        f.seek(0)
                        digest = _sha256_stream(f)
                    else:
                        digest = record["sha256"]
                counts["scored_rows"] += meta.num_rows
                for key in _SUMMED.values():
                    counts[key] += stored[key]
                if formats is not None and isinstance(stored.get("formats"), dict):
                    formats.update(stored["formats"])
                else:
                    formats = None  # unknown for some shard: not claimed for any
                shards.append({"file": f"data/{name}.parquet", "rows": meta.num_rows,
                               "sha256": digest})
                try:
                    rejected_fd = open_regular(f"{name}.jsonl", fds["rejected"],
                                               self.rejected / f"{name}.jsonl")
                except FileNotFoundError:
                    raise InputError(
                        f"{self.rejected / name}.jsonl is missing; rerun the same command: it "
                        "scores that shard again (finished shards are kept)") from None
                with os.fdopen(rejected_fd, "rb") as f:
                    data = f.read()
                if data and not data.endswith(b"\n"):
                    data += b"\n"
                gathered.write(data)
                # Count "\n" alone: a reason may hold U+2028, which splitlines would split.
                n_rejected += data.count(b"\n")
        counts["rejected_rows"] = n_rejected
        if formats and isinstance(manifest.get("render"), dict):
            manifest = {**manifest, "render": {**manifest["render"], "formats": dict(formats)}}
        manifest = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "counts": counts,
            "shards": shards,
            "schema": [f.name for f in SCHEMA],
        }
        with self._folders() as fds:
            place(fds[""], MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(),
                  self.path / MANIFEST)
        return manifest


# A shard file as a manifest may name it: a plain file name inside data/ (no path tricks, no
# control characters that an error message would echo).
_SHARD_FILE = re.compile(r"data/[A-Za-z0-9_][A-Za-z0-9_.-]*\.parquet")
# Manifest keys that readers use as objects (``manifest["tokenizer"].get(...)``).
_OBJECT_KEYS = ("model", "tokenizer", "chat_template", "mask", "counts", "columns")
_RESCORE = "rerun the same `profit-prep score` command to rewrite it (finished shards are kept)"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a finished output.

    One clear :class:`InputError` (never a traceback) when the run is unfinished or absent, or
    the manifest is damaged: not JSON (truncated), not an object, no ``shards`` list, or a shard
    entry without a valid ``file``/``rows``/``sha256``.
    """
    file = Path(path) / MANIFEST
    if not file.exists():
        if (Path(path) / "run.json").exists():
            raise InputError(f"{path}: the run has not finished (no manifest); rerun to resume")
        raise InputError(f"{path}: not a profit-prep output (no {MANIFEST})")
    try:
        manifest = read_json_object(file, "the manifest", _RESCORE)
    except OSError as exc:
        raise InputError(f"{file}: cannot read the manifest ({os_reason(exc)})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{file} is damaged ({problem}); {_RESCORE}")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable by the readers, or None."""
    for key in _OBJECT_KEYS:
        if key in manifest and not isinstance(manifest[key], dict):
            return f"{key!r} is not an object"
    if "shards" not in manifest:
        return "no 'shards' list"
    if not isinstance(manifest["shards"], list):
        return "'shards' is not a list"
    seen = set()
    for n, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            return f"shard entry {n} is not an object"
        file, rows = shard.get("file"), shard.get("rows")
        if not isinstance(file, str) or not _SHARD_FILE.fullmatch(file):
            return f"shard entry {n}: 'file' is not data/NAME.parquet ({ascii(file)[:80]})"
        if file in seen:
            return f"{file} is listed twice"
        seen.add(file)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            return f"{file}: 'rows' is not a row count"
        if not isinstance(shard.get("sha256"), str):
            return f"{file}: no 'sha256'"
    return _totals_problem(manifest)


def _count(obj: Any, key: str) -> int | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _totals_problem(manifest: dict[str, Any]) -> str | None:
    """Whether the manifest's totals agree with its own shard list and input, or what differs:
    a shard list cut short (or grown) no longer sums to ``counts.scored_rows``, and scored plus
    rejected rows must be the input rows the run read (``input.rows`` up to ``input.limit``)."""
    counts = manifest.get("counts")
    scored = _count(counts, "scored_rows")
    listed = sum(shard["rows"] for shard in manifest["shards"])
    if scored is not None and scored != listed:
        return (f"counts.scored_rows is {scored} but the shard list holds {listed} rows: the "
                "shard list was cut short or edited")
    rejected = _count(counts, "rejected_rows")
    rows, limit = _count(manifest.get("input"), "rows"), _count(manifest.get("input"), "limit")
    if scored is not None and rejected is not None and rows is not None:
        expected = min(rows, limit) if limit else rows
        if scored + rejected != expected:
            return (f"{scored} scored + {rejected} rejected rows, but the input had {expected}: "
                    "the counts or the shard list were edited")
    return None


def shard_problems(
    path: str | Path, manifest: dict[str, Any], *, checksum: bool = True
) -> list[str]:
    """Every way the output's files differ from the manifest (empty: none), one line each.

    A shard must be present, be the very file the run wrote (its sha256, and its size when the
    manifest records ``bytes``; not a link), be readable Parquet with the recorded row count
    and the core columns. A valid shard copied over another, or a truncated one, fails the
    checksum. Then the cross-checks: every file in ``data/`` must be listed (readers of
    ``data/*.parquet`` would read an unlisted one too), the shards' footer counts must sum to
    the manifest's ``counts``, and ``rejected.jsonl`` must hold ``counts.rejected_rows`` rows.
    ``checksum=False`` reads only each file's footer and lists unlisted files (for callers that
    need a schema only): the checksums, the counts and ``rejected.jsonl`` are left to the full
    check every reader makes before it reads rows.
    """
    problems = []
    sums: dict[str, int] | None = dict.fromkeys(_SUMMED.values(), 0)
    for shard in manifest["shards"]:
        name = shard["file"]
        file = Path(path) / name
        try:
            st = file.lstat()
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{name}: {kind_of(st.st_mode)}, not the file the run wrote")
                continue
            size = st.st_size
            if "bytes" in shard and size != shard["bytes"]:
                problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
                continue
            if checksum and sha256_file(file) != shard["sha256"]:
                problems.append(
                    f"{name}: checksum differs from the manifest (changed, replaced or truncated)"
                )
                continue
            meta = pq.read_metadata(file)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as exc:
            problems.append(f"{name}: cannot read it ({os_reason(exc)})")
            continue
        except pa.ArrowException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(f"{name}: not a readable Parquet file ({reason})")
            continue
        if meta.num_rows != shard["rows"]:
            problems.append(f"{name}: {meta.num_rows} rows, manifest says {shard['rows']}")
        names = set(meta.schema.to_arrow_schema().names)
        missing = [f.name for f in SCHEMA if f.name not in names]
        if missing:
            problems.append(f"{name}: missing columns {', '.join(missing)}")
        stored = _stored_counts(meta)
        if stored is None:
            sums = None  # a shard of an older version: its counts are in its columns only
        elif sums is not None:
            for key in sums:
                sums[key] += stored[key]
    problems += _unlisted(Path(path), manifest)
    counts = manifest.get("counts")
    if checksum and not problems and sums is not None and isinstance(counts, dict):
        for key, total in sums.items():
            if _count(counts, key) is not None and counts[key] != total:
                problems.append(f"counts.{key} is {counts[key]} but the shards hold {total}")
    rejected = _count(counts, "rejected_rows")
    if checksum and rejected is not None:
        problems += _rejected_problem(Path(path), rejected)
    return problems


def _unlisted(path: Path, manifest: dict[str, Any]) -> list[str]:
    """Each entry of ``data/`` the manifest does not list (temporaries of a write excepted)."""
    data = path / "data"
    if data.is_symlink() or (data.exists() and not data.is_dir()):
        return [f"data: {kind_of(data.lstat().st_mode)}, not the folder the run made"]
    listed = {shard["file"] for shard in manifest["shards"]}
    entries = sorted(os.listdir(data)) if data.is_dir() else []
    return [f"data/{visible_name(n)}: not in the manifest (readers of data/ would read it too)"
            for n in entries if f"data/{n}" not in listed and not _OWN_TEMP.fullmatch(n)]


def visible_name(name: str) -> str:
    """A file name as an error line may show it (no control characters, no lone surrogates)."""
    return name if name.isprintable() else ascii(name)[1:-1]


def _rejected_problem(path: Path, expected: int) -> list[str]:
    file = path / REJECTED
    try:
        with file.open("rb") as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return [f"{REJECTED}: missing (the manifest counts {expected} rejected rows)"] \
            if expected else []
    except OSError as exc:
        return [f"{REJECTED}: cannot read it ({os_reason(exc)})"]
    if lines != expected:
        return [f"{REJECTED}: {lines} rows, manifest counts {expected}"]
    return []


def check_shards(path: str | Path, manifest: dict[str, Any], *, checksum: bool = True) -> None:
    """Refuse, in one line naming the first bad shard and the remedy, an output whose shard
    files do not match its manifest (:func:`shard_problems`). Every reader calls this first."""
    problems = shard_problems(path, manifest, checksum=checksum)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            f"{path}: damaged output: {problems[0]}{more}; `profit-prep verify {path}` lists "
            "every problem; restore the files, or delete the damaged shards and rerun the same "
            "`profit-prep score` command to rescore them"
        )


def verify(path: str | Path) -> list[str]:
    """Check shard files against the manifest: presence, checksums, row counts, schema."""
    return shard_problems(path, read_manifest(path))
