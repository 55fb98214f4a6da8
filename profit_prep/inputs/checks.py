"""Checks on untrusted input before and while it is read: strings that are not valid Unicode
(lone surrogates, which JSON's ``\\ud800`` escapes can make), data paths that are not valid UTF-8
or not files, JSON files in another encoding, and unreadable Parquet files. Each fault is one
clear line, never a traceback from inside a reader.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from profit_prep.errors import InputError

BOM = "\ufeff"  # a UTF-8 byte-order mark, decoded: every reader skips it at a file's start
_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def invalid_text(data: Any) -> str | None:
    """Where ``data`` (a row: dicts, lists, strings) holds a string that is not valid Unicode (a
    lone surrogate, which JSON's ``\\ud800`` escapes can make), as a field path such as
    ``messages[1].content``; None if it holds none. Iterative, and a path is built only for the
    string found, so any nesting depth costs time linear in the row."""
    # (value, parent entry, label): a linked path, joined only on a hit.
    stack: list[tuple[Any, Any, str]] = [(data, None, "")]
    while stack:
        entry = stack.pop()
        value = entry[0]
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return _path(entry) or "the row"
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    where = _path(entry)
                    name = f"field name {escape_text(key)!r}"
                    return f"{where} {name}" if where else name
                stack.append((item, entry, f".{key}"))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, entry, f"[{i}]") for i, item in enumerate(value))
    return None


def _path(entry: tuple[Any, Any, str]) -> str:
    labels = []
    while entry is not None:
        labels.append(entry[2])
        entry = entry[1]
    return escape_text("".join(reversed(labels)).removeprefix("."))


def escape_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udxxx``: always encodable as UTF-8."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_path(name: str, what: str) -> None:
    """Refuse a path that is not valid UTF-8 (undecodable bytes arrive as surrogate escapes)
    up front: it could not be recorded in the manifest or printed as it is."""
    if _SURROGATE.search(name):
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise InputError(f"{what} path {shown!r} is not valid UTF-8; rename it")


_KINDS = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def check_kind(p: Path) -> None:
    """A path that exists but is neither a file nor a folder: one accurate line, at once (a
    FIFO cannot be indexed, read twice or digested; opening one would block)."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return  # absent: a hub name, or "no such file" below
    for test, kind in _KINDS.items():
        if test(mode):
            raise InputError(f"{p}: is {kind}, not a data file; write the rows to a .jsonl, "
                             ".json or .parquet file")


_LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".gz", ".csv", ".txt", ".arrow")


def looks_local(name: str) -> bool:
    """A name no ``datasets`` hub id can be: a file suffix, or a path from the root or ``.``."""
    return name.lower().endswith(_LOCAL_SUFFIXES) or name.startswith(("/", "./", "../", "~"))


def check_encoding(p: Path) -> None:
    """JSON is UTF-8 (a UTF-8 BOM is skipped by every reader); a UTF-16 or UTF-32 file would
    have every row rejected as invalid UTF-8, so it is refused with one line."""
    with open(p, "rb") as f:
        head = f.read(4)
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            raise InputError(f"{p}: the file is {name}-encoded; JSON input must be UTF-8 "
                             f"(convert it, e.g. iconv -f {name} -t UTF-8)")



def check_parquet(files: list[Path]) -> None:
    """One clear line for a truncated or non-Parquet file, before datasets reads it."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            pq.read_metadata(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for one fault
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{file}: not a readable Parquet file ({first})") from None
