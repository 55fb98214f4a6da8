"""Link-safe file primitives: nothing opened through a link, one atomic write, checksums.

Everything profit-prep writes goes through :func:`atomic_file`; inside an output folder files
and folders are opened by descriptor with ``O_NOFOLLOW`` (docs/format.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from profit_prep.errors import InputError


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
LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


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


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
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
        st = lstat_at(name, dir_fd) if exc.errno in LINK_ERRNOS else None
        if st is not None:
            raise not_ours(where, st.st_mode, "a folder") from None
        raise


def open_regular(name: str, dir_fd: int, where: Path) -> int:
    """A read descriptor of the regular file ``name`` in ``dir_fd``; a link, FIFO or device is
    refused (never followed, never blocked on). FileNotFoundError when absent."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        st = lstat_at(name, dir_fd) if exc.errno in LINK_ERRNOS else None
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
    st = lstat_at(name, dir_fd)
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
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return "sha256:" + digest.hexdigest()


def sha256_bytes(data: bytes | memoryview | pa.Buffer) -> str:
    return "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()


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

