"""Reading an output on an object store: a local copy verified against its manifest.

``load``, ``verify``, ``stats``, ``inspect``, ``report`` and ``combine`` read outputs by path,
memory-map shards and check them with the local reader (:mod:`profit_prep.store.reader`); for a
URL, :func:`local_output` first brings the output into ``~/.cache/profit-prep/outputs/``, in a
folder keyed by the URL's hash (no credential can reach a key or a path: a URL carrying one is
refused by :mod:`profit_prep.store.urls`) and the manifest's sha256, and the readers then run on
that copy exactly as on a local output. Every shard the manifest lists is fetched unless the
cached file is the one the manifest names (its sha256: checked when it was fetched, and again
whenever the file changed since) and the store's object is the one it was fetched from (size,
ETag); one whose checksum fails is fetched again. A second load of an unchanged output reads
``manifest.json`` and one listing of the prefix, and downloads nothing else; under a new manifest
of the same URL, the shards already verified move to the new copy and the old copy goes.
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
from profit_prep.store.names import MANIFEST, REJECTED
from profit_prep.store.reader import _manifest_problem
from profit_prep.store.urls import describe, filesystem, is_url, redact

_BLOCK = 8 << 20
_VERIFIED = ".profit-prep-verified.json"  # file -> [size, mtime_ns, inode, sha256]


def _cache_root() -> Path:
    from profit_prep.scorers.models import cache_dir

    return cache_dir() / "outputs"


def local_output(path: str | Path, *, strict: bool = True) -> Path:
    """``path`` itself for a local output; for a URL, the verified local copy of it.

    ``strict`` (every reader) refuses, in one line naming the URL, an output whose manifest lists
    a shard that is missing from the store or whose bytes there differ from the manifest's
    checksum; ``verify`` passes ``strict=False`` and lists those problems itself.
    """
    if not is_url(str(path)):
        return Path(path)
    url = str(path).rstrip("/")
    fs, root = filesystem(url, "OUT")
    shown = redact(url)
    raw = _read(fs, f"{root}/{MANIFEST}", shown)
    if raw is None:
        if _read(fs, f"{root}/run.json", shown) is not None:
            raise InputError(f"{shown}: the run has not finished (no manifest); rerun to resume")
        raise InputError(f"{shown}: not a profit-prep output (no {MANIFEST})")
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    problem = ("not a JSON object" if not isinstance(manifest, dict)
               else _manifest_problem(manifest))
    if problem:
        raise InputError(f"{shown}/{MANIFEST} is damaged ({problem}); rerun the same "
                         "`profit-prep score` command to rewrite it (finished shards are kept)")
    assert isinstance(manifest, dict)
    digest = hashlib.sha256(raw).hexdigest()
    home = (_cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24] / digest[:24])
    (home / "data").mkdir(parents=True, exist_ok=True)
    verified = _load_verified(home)
    # Copies made under earlier manifests of this URL (a run resumed or extended since): their
    # verified shards move here instead of being fetched again; the rest of them goes.
    earlier = [d for d in home.parent.iterdir() if d.is_dir() and d.name != home.name]
    _adopt(home, verified, earlier)
    _place(home, MANIFEST, raw)
    on_store = _listing(fs, root, shown)
    failed = []
    for shard in manifest["shards"]:
        name = shard["file"]
        info = on_store.get(name)
        if info is None:  # gone from the store: the output there is damaged, whatever is cached
            failed.append(f"{name}: missing")
            _forget(home, name, verified)
            continue
        if _trusted(home, name, shard["sha256"], verified, _store_id(info)):
            continue
        got = _fetch(fs, f"{root}/{name}", home, name, shown, verified, _store_id(info))
        if got is None:
            failed.append(f"{name}: missing")
        elif got != _hex(shard["sha256"]):
            failed.append(f"{name}: checksum differs from the manifest (changed, replaced or "
                          "truncated)")
    # Beside the shards, what readers also open: the rejected rows (all, and per shard:
    # combine carries them over) and run.json. The manifest has no checksum of them: they are
    # fetched again whenever the store's object (size, ETag) or the cached file changed.
    (home / "rejected").mkdir(exist_ok=True)
    extras = [REJECTED, "run.json",
              *(f"rejected/{PurePosixPath(s['file']).stem}.jsonl" for s in manifest["shards"])]
    for name in extras:
        info = on_store.get(name)
        if info is None:
            _forget(home, name, verified)
        elif not _unchanged(home, name, verified, _store_id(info)):
            _fetch(fs, f"{root}/{name}", home, name, shown, verified, _store_id(info))
    _mirror_unlisted(home, manifest, on_store)
    _save_verified(home, verified)
    for old in earlier:
        shutil.rmtree(old, ignore_errors=True)
    if strict and failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise InputError(f"{shown}: damaged output: {failed[0]}{more}; `profit-prep verify "
                         f"{shown}` lists every problem")
    return home


def _adopt(home: Path, verified: dict[str, Any], earlier: list[Path]) -> None:
    """Move the shards of earlier copies into ``home`` with their verification records (a
    rename keeps the file's identity, so the record stays valid; :func:`_trusted` decides
    later whether the manifest and the store still name them)."""
    for old in earlier:
        records = _load_verified(old)
        for name, known in records.items():
            if not name.startswith("data/") or name in verified:
                continue
            if isinstance(known, list) and len(known) == 5 and known[:3] == _identity(old / name):
                with contextlib.suppress(OSError):
                    os.replace(old / name, home / name)
                    verified[name] = known


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _read(fs: Any, key: str, shown: str) -> bytes | None:
    try:
        with fs.open(key, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except Exception as exc:  # the store client's errors: one redacted line
        raise InputError(f"{shown}: cannot read {PurePosixPath(key).name} "
                         f"({describe(exc)})") from None


def _identity(file: Path) -> list[int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _store_id(info: dict[str, Any]) -> list[Any]:
    """What a write to an object changes: its size and ETag (version / generation too)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c")
    version = info.get("VersionId") or info.get("generation")
    return [int(info.get("size") or 0), str(etag) if etag else None,
            str(version) if version else None]


def _listing(fs: Any, root: str, shown: str) -> dict[str, dict[str, Any]]:
    """The output's objects: name relative to OUT -> info (size, ETag), one listing for all."""
    prefix = root + "/"
    try:
        found = fs.find(root, withdirs=False, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # the store client's errors: one redacted line
        raise InputError(f"{shown}: cannot list it ({describe(exc)})") from None
    return {key[len(prefix):]: info for key, info in found.items() if key.startswith(prefix)}


def _forget(home: Path, name: str, verified: dict[str, Any]) -> None:
    with contextlib.suppress(FileNotFoundError):
        (home / name).unlink()
    verified.pop(name, None)


def _unchanged(home: Path, name: str, verified: dict[str, Any], store_id: list[Any]) -> bool:
    """Whether the cached ``name`` is as fetched, from the store object as it is now."""
    known = verified.get(name)
    return (isinstance(known, list) and len(known) == 5 and known[4] == store_id
            and known[:3] == _identity(home / name))


def _trusted(home: Path, name: str, digest: str, verified: dict[str, Any],
             store_id: list[Any]) -> bool:
    """Whether the cached ``name`` is the file the manifest names and the store still holds:
    its sha256 (computed when it was fetched, and again if the file changed since) and the
    store object's size and ETag then and now."""
    file = home / name
    ident = _identity(file)
    known = verified.get(name)
    if ident is None or not isinstance(known, list) or len(known) != 5:
        return False
    if known[:3] != ident:
        sha = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                sha.update(block)
        known = verified[name] = [*ident, sha.hexdigest(), known[4]]
    return known[3] == _hex(digest) and known[4] == store_id


def _fetch(fs: Any, key: str, home: Path, name: str, shown: str, verified: dict[str, Any],
           store_id: list[Any] | None) -> str | None:
    """Download ``key`` to ``home/name`` (a temporary, then renamed); its sha256, or None when
    the store has no such object."""
    target = home / name
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
    sha = hashlib.sha256()
    try:
        with fs.open(key, "rb", block_size=_BLOCK) as src, tmp.open("wb") as dst:
            for block in iter(lambda: src.read(_BLOCK), b""):
                sha.update(block)
                dst.write(block)
        os.replace(tmp, target)
    except FileNotFoundError:
        return None
    except Exception as exc:  # the store client's errors: one redacted line
        raise InputError(f"{shown}: cannot read {name} ({describe(exc)})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    verified[name] = [*(_identity(target) or [0, 0, 0]), sha.hexdigest(), store_id]
    return sha.hexdigest()


def _mirror_unlisted(home: Path, manifest: dict[str, Any],
                     on_store: dict[str, dict[str, Any]]) -> None:
    """Make the copy's ``data/`` list what the store's does: an object there that the manifest
    does not list is shown by an empty file of its name, so the readers refuse it as they do
    locally ("readers of data/ would read it too"); cached files no longer there go."""
    listed = {PurePosixPath(s["file"]).name for s in manifest["shards"]}
    in_data = {k[len("data/"):] for k in on_store if k.startswith("data/")}
    for name in sorted(in_data - listed):
        if "/" in name or not name or name.startswith("."):
            continue  # a writer's temporary, or a nested key: not a file of data/ here
        with contextlib.suppress(OSError):
            (home / "data" / name).touch()
    for entry in os.listdir(home / "data"):
        if entry not in in_data and not entry.startswith("."):
            with contextlib.suppress(OSError):
                (home / "data" / entry).unlink()


def _place(home: Path, name: str, data: bytes) -> None:
    tmp = home / f".{name}.{secrets.token_hex(4)}"
    tmp.write_bytes(data)
    os.replace(tmp, home / name)


def _load_verified(home: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        known = json.loads((home / _VERIFIED).read_text())
        if isinstance(known, dict):
            return known
    return {}


def _save_verified(home: Path, verified: dict[str, Any]) -> None:
    _place(home, _VERIFIED, json.dumps(verified).encode())
