"""Index a JSON array of rows without parsing it: the byte span of every element."""

from __future__ import annotations

import mmap
import os
import re
from array import array
from pathlib import Path

import numpy as np

from profit_prep.errors import InputError

_RELEASE = 64 << 20  # json_array_spans releases scanned pages of the file in steps of this
_STRUCTURE = re.compile(rb'[\[\]{},"]')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_array_spans(path: Path) -> np.ndarray:
    """Byte spans ``(begin, end)`` of the elements of the JSON array in ``path`` as a (rows, 2)
    int64 array, found by a scan that tracks strings and bracket depth without recursion (so any
    nesting depth is fine). Pages already scanned are dropped from this process's memory as it
    goes, so a large file does not sit in its resident set."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            raise InputError(f"{path}: empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            pos = 3 if data[:3] == b"\xef\xbb\xbf" else 0  # a UTF-8 byte-order mark
            while pos < size and data[pos : pos + 1].isspace():
                pos += 1
            if data[pos : pos + 1] != b"[":
                raise InputError(f"{path}: expected a JSON array of rows")
            spans = array("q")
            depth, element, pos = 0, pos + 1, pos + 1
            dropped = 0  # bytes before this are released (madvise) once scanned
            while True:
                if pos - dropped >= _RELEASE and hasattr(data, "madvise"):
                    upto = pos - pos % mmap.PAGESIZE
                    data.madvise(mmap.MADV_DONTNEED, dropped, upto - dropped)
                    dropped = upto
                match = _STRUCTURE.search(data, pos)
                if match is None:
                    raise InputError(f"{path}: the JSON array is not closed (file truncated?)")
                char, at = match.group(), match.start()
                if char == b'"':
                    string = _STRING.match(data, at)
                    if string is None:
                        raise InputError(f"{path}: unterminated string at byte {at}")
                    pos = string.end()
                    continue
                pos = at + 1
                if depth > 0 and char == b",":
                    continue
                if char in b"[{":
                    depth += 1
                elif depth > 0 and char in b"]}":
                    depth -= 1
                elif char == b"}":
                    raise InputError(f"{path}: unbalanced '}}' at byte {at}")
                elif char in b",]":  # the end of an element at the array's own level
                    raw = data[element:at]
                    lead = len(raw) - len(raw.lstrip())
                    span = (element + lead, element + len(raw.rstrip()))
                    if char == b"," or spans or span[1] > span[0]:
                        spans.extend(span)
                    element = pos
                    if char == b"]":
                        if data[pos:].strip():
                            raise InputError(f"{path}: text after the JSON array (byte {pos})")
                        return np.frombuffer(spans, np.int64).reshape(-1, 2).copy()
