"""``--data s3://...``: an input on an object store, read through a verified local copy.

The sources (:mod:`profit_prep.inputs.sources`) read by index range with seeks (JSONL line
offsets, JSON array spans, Parquet row groups) and check encodings and kinds on a local file;
over an object store each seek would be a ranged GET, and successive GETs of an object
overwritten meanwhile would mix two versions. So the input is copied once, pinned to what the
store said it was (size, ETag, version), into ``~/.cache/profit-prep/inputs/`` and read there
with every local check; the copy is reused while the store's object is unchanged and rehashed
(sha256 recorded at download) before each reuse. What identifies the input, and is checked again
before the manifest (:func:`stamp`), is the store's own record of each object: a write to it
changes the ETag (and the version, where versioning is on), as a local write changes inode
times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from profit_prep.errors import InputError
from profit_prep.store.urls import describe, filesystem, is_url, redact

_BLOCK = 8 << 20  # download and hashing block: 8 MiB


def _cache_root() -> Path:
    from profit_prep.scorers.models import cache_dir

    return cache_dir() / "inputs"


def _objects(data: str, out: str | None) -> tuple[Any, bool, list[tuple[str, dict[str, Any]]]]:
    """The filesystem, whether ``data`` is a prefix (a folder), and (relative name, info) of
    every object it names: the object itself, or every object under the prefix (none inside
    ``out``)."""
    fs, path = filesystem(data, "--data")
    try:
        info = fs.info(path)
        folder = info.get("type") == "directory"
        if folder:
            found = fs.find(path, detail=True, withdirs=False)
            skip = None
            if out is not None and is_url(out):
                skip = filesystem(out, "--out")[1].rstrip("/") + "/"
            entries = [(PurePosixPath(key).relative_to(path).as_posix(), found[key])
                       for key in sorted(found)
                       if not (skip and (key + "/").startswith(skip))]
        else:
            entries = [(PurePosixPath(path).name, info)]
    except FileNotFoundError:
        raise InputError(f"--data {redact(data)}: no such object or prefix") from None
    except InputError:
        raise
    except Exception as exc:  # the store client's errors: one redacted line
        raise InputError(f"--data {redact(data)}: {describe(exc)}") from None
    if not entries:
        raise InputError(f"--data {redact(data)}: an empty prefix, not a dataset")
    return fs, folder, entries


def _identity(info: dict[str, Any]) -> list[Any]:
    """What a write to an object changes: its size, ETag (a content hash for single-part
    uploads) and version id / generation where the store keeps versions."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c")
    version = info.get("VersionId") or info.get("generation")
    return [int(info.get("size") or 0), str(etag).strip('"') if etag else None,
            str(version) if version else None]


def stamp(data: str, out: str | None = None) -> list[list[Any]]:
    """The input's identity on the store: per object, its name, size, ETag and version. Taken
    before the first read and again before the manifest (``Prepared.check_input_unchanged``)."""
    _, _, entries = _objects(data, out)
    return [[name, *_identity(info)] for name, info in entries]


def local_copy(data: str, out: str | None, started: list[list[Any]]) -> Path:
    """A verified local copy of the input as ``started`` (:func:`stamp`) describes it: a file,
    or a folder holding the prefix's objects under their relative names."""
    fs, is_folder, entries = _objects(data, out)
    now = [[name, *_identity(info)] for name, info in entries]
    if now != started:
        raise InputError(f"--data {redact(data)} changed while this run was opening it; rerun")
    url_key = hashlib.sha256(redact(data).encode()).hexdigest()[:20]
    stamp_key = hashlib.sha256(json.dumps(started).encode()).hexdigest()[:20]
    home = _cache_root() / url_key
    folder = home / stamp_key
    record_file = folder / ".profit-prep-copy.json"
    if record_file.exists() and _copy_intact(folder, record_file):
        return folder if is_folder else folder / entries[0][0]
    # A fresh copy: beside the old ones of this URL (other stamps), which are dropped after.
    tmp = home / f".tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        hashes = {}
        for name, info in entries:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            hashes[name] = _download(fs, info["name"], target, info, data)
        after = stamp(data, out)
        if after != started:
            raise InputError(f"--data {redact(data)} changed while it was being copied; rerun "
                             "(the copy is taken again)")
        (tmp / record_file.name).write_text(json.dumps(hashes))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in home.iterdir():  # copies of earlier versions of this input: no longer read
        if old.name != stamp_key and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return folder if is_folder else folder / entries[0][0]


def _download(fs: Any, key: str, target: Path, info: dict[str, Any], data: str) -> str:
    """Copy one object to ``target``; its sha256. The size must be the listed one, and a
    single-part ETag (the MD5 of the bytes) must match."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
        with fs.open(key, "rb", block_size=_BLOCK) as src, target.open("wb") as dst:
            for block in iter(lambda: src.read(_BLOCK), b""):
                sha.update(block)
                md5.update(block)
                size += len(block)
                dst.write(block)
    except Exception as exc:  # the store client's errors: one redacted line
        raise InputError(f"--data {redact(data)}: cannot read it ({describe(exc)})") from None
    expected, etag, _ = _identity(info)
    simple_etag = etag is not None and len(etag) == 32 and "-" not in etag
    if size != expected or (simple_etag and md5.hexdigest() != etag.lower()):
        raise InputError(f"--data {redact(data)}: the copy of {key.rsplit('/', 1)[-1]} does not "
                         "match the store's size or ETag (changed while copied); rerun")
    return sha.hexdigest()


def _copy_intact(folder: Path, record_file: Path) -> bool:
    """Whether every file of a cached copy still has the sha256 recorded at download."""
    with contextlib.suppress(OSError, ValueError):
        hashes = json.loads(record_file.read_text())
        for name, digest in hashes.items():
            sha = hashlib.sha256()
            with (folder / name).open("rb") as f:
                for block in iter(lambda f=f: f.read(_BLOCK), b""):
                    sha.update(block)
            if sha.hexdigest() != digest:
                return False
        return isinstance(hashes, dict) and bool(hashes)
    return False
