"""Reading a finished output: its manifest, and every check of its files against it.

The reader's half of the output contract (:mod:`profit_prep.store.writer` writes it); every reader
calls :func:`check_shards` before it reads rows.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.store.names import MANIFEST, OWN_TEMP, REJECTED
from profit_prep.store.safe_files import kind_of, os_reason, read_json_object, sha256_file
from profit_prep.store.schema import SCHEMA
from profit_prep.store.shard_counts import SUMMED, stored_counts

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
    sums: dict[str, int] | None = dict.fromkeys(SUMMED.values(), 0)
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
        stored = stored_counts(meta)
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
            for n in entries if f"data/{n}" not in listed and not OWN_TEMP.fullmatch(n)]


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
