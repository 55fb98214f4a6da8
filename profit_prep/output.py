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
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


# What profit-prep writes into an output folder (and so the only things --overwrite removes).
_OWN_TOP = {"run.json", MANIFEST, ".lock", REJECTED, "report.html"}
_OWN_IN = {"data": re.compile(r"part-\d{5}\.parquet"), "rejected": re.compile(r"part-\d{5}\.jsonl")}
# Temporaries of atomic writes (tempfile.mkstemp adds 8 random characters).
_OWN_TEMP = re.compile(r"\.(run\.json|manifest\.json|rejected\.jsonl|report\.html|"
                       r"part-\d{5}\.(parquet|jsonl))\.[A-Za-z0-9_]{8}")


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


def remove_own_files(path: Path) -> None:
    """Delete profit-prep's own files in ``path`` (the caller has checked nothing else is there)."""
    for entry in sorted(path.iterdir()):
        if entry.name in _OWN_IN and entry.is_dir() and not entry.is_symlink():
            for f in entry.iterdir():
                if f.is_file() and not f.is_symlink() and _own_file(entry.name, f.name):
                    f.unlink()
        elif entry.name != ".lock" and entry.is_file() and not entry.is_symlink() \
                and _own_file(None, entry.name):
            entry.unlink()


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
    source: Path | pa.Table, end_of_turn_ids: Sequence[int]
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


class OutputDir:
    """An output directory being written by one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = self.path / "data"
        self.rejected = self.path / "rejected"
        self._lock_file: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, params: dict[str, Any], *, overwrite: bool = False) -> Iterator[OutputDir]:
        """Lock the directory and check (or record) the run's parameters.

        ``overwrite`` removes only files profit-prep writes, and only in a directory it
        recognises as its own (``run.json`` or ``manifest.json`` present, nothing else there).
        """
        self._check_own(overwrite)  # before the lock file: never leave one in a foreign folder
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the run
        except OSError as exc:
            raise InputError(f"--out {self.path}: cannot write there ({os_reason(exc)})") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InputError(f"{self.path}: another run is writing here (lock held)") from None
        try:
            self._check_own(overwrite)  # again under the lock: another run may have written
            self._prepare(params, overwrite)
            yield self
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def check_writable(self, overwrite: bool) -> None:
        """Fail now, before a model loads, if ``open`` would refuse this folder."""
        self._check_own(overwrite)

    def all_done(self, n_shards: int) -> bool:
        return all(self.shard_done(i) for i in range(n_shards))

    def _check_own(self, overwrite: bool) -> None:
        """Refuse an ``--out`` that is a file, or a folder holding anything profit-prep did not
        write (with ``--overwrite`` too: it would delete the user's files)."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"--out {self.path} is a file, not a directory; choose a folder")
        if not self.path.is_dir():
            return
        entries = list(self.path.iterdir())
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
            remove_own_files(self.path)
        elif run_file.exists():
            previous = read_json_object(
                run_file, "the run's parameters", "use --overwrite to start this output again"
            )
            self._remove_temporaries()
            if previous != params:
                changed = sorted(
                    k for k in set(previous) | set(params) if previous.get(k) != params.get(k)
                )
                raise InputError(
                    f"{self.path} holds a run with other parameters ({', '.join(changed)} "
                    "differ); use another --out, or --overwrite to replace it"
                )
            return
        elif any(e.name != ".lock" for e in self.path.iterdir()):
            raise InputError(f"{self.path} holds an output without run.json (a damaged run); "
                             "use --overwrite to start it again, or another --out")
        self.data.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, params)

    def _remove_temporaries(self) -> None:
        """Drop half-written files a killed run left behind (never visible as shards)."""
        for folder in (self.data, self.rejected, self.path):
            for tmp in folder.iterdir() if folder.is_dir() else []:
                if _OWN_TEMP.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)

    # -- shards -----------------------------------------------------------------------------

    def shard_done(self, index: int) -> bool:
        return (self.data / f"{shard_name(index)}.parquet").exists()

    def input_digest(self, index: int) -> str | None:
        """The input digest stored with a finished shard (None for outputs that predate it)."""
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
        """Write one shard's rejected rows, then its data (the data file marks it done).

        ``input_digest`` (a hash of the shard's input rows) goes into the Parquet footer, so a
        resumed run can tell whether the input changed since (docs/format.md). So do the
        shard's counts (:func:`shard_counts`; ``formats``: each scored row's input format), so
        that :meth:`finalize` reads footers only, however large the output.
        """
        metadata = dict(table.schema.metadata or {})
        if input_digest is not None:
            metadata[INPUT_DIGEST_KEY] = input_digest.encode()
        counts = shard_counts(table, end_of_turn_ids, formats)
        metadata[SHARD_COUNTS_KEY] = json.dumps(counts, separators=(",", ":")).encode()
        table = table.replace_schema_metadata(metadata)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
        atomic_write_bytes(self.rejected / f"{shard_name(index)}.jsonl", lines.encode())
        target = self.data / f"{shard_name(index)}.parquet"
        fd, tmp = temporary_file(self.data, target.name)
        os.close(fd)
        try:
            # Float columns (logprobs and any later signal) compress ~1.6x better split by
            # byte plane; dictionary encoding would take precedence over that, so it is kept for
            # the id column alone. Measured on GSM8K: 6.3 -> 4.7 bytes per token.
            floats = [
                f.name
                for f in table.schema
                if pa.types.is_floating(getattr(f.type, "value_type", f.type))
            ]
            pq.write_table(
                table,
                tmp,
                compression="zstd",
                use_dictionary=["example_id"],
                use_byte_stream_split=floats,
            )
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

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
        lists one entry (~150 bytes) per shard.
        """
        shards: list[dict[str, Any]] = []
        counts = dict.fromkeys(["scored_rows", *_SUMMED.values()], 0)
        if end_of_turn_ids is not None:
            counts.update(end_of_turn_tokens=0, end_of_turn_masked=0)
        formats: Counter[str] | None = Counter()
        n_rejected = 0
        fd, tmp = temporary_file(self.path, REJECTED)
        try:
            with os.fdopen(fd, "wb") as gathered:
                for index in range(n_shards):
                    name = shard_name(index)
                    path = self.data / f"{name}.parquet"
                    meta = pq.read_metadata(path)
                    stored = _stored_counts(meta)
                    if stored is None:  # a shard from before counts were kept in footers
                        stats = pq.read_table(path, columns=list(_SUMMED))
                        stored = shard_counts(stats)
                    counts["scored_rows"] += meta.num_rows
                    for key in _SUMMED.values():
                        counts[key] += stored[key]
                    if end_of_turn_ids is not None:
                        eot = stored.get("end_of_turn") or {}
                        if eot.get("ids") == list(end_of_turn_ids):
                            total, masked = int(eot["tokens"]), int(eot["masked"])
                        else:
                            total, masked = _end_of_turn_counts(path, end_of_turn_ids)
                        counts["end_of_turn_tokens"] += total
                        counts["end_of_turn_masked"] += masked
                    if formats is not None and isinstance(stored.get("formats"), dict):
                        formats.update(stored["formats"])
                    else:
                        formats = None  # unknown for some shard: not claimed for any
                    file = f"data/{name}.parquet"
                    shards.append({"file": file, "rows": meta.num_rows,
                                   "sha256": sha256_file(path)})
                    data = (self.rejected / f"{name}.jsonl").read_bytes()
                    if data and not data.endswith(b"\n"):
                        data += b"\n"
                    gathered.write(data)
                    # Count "\n" alone: a reason may hold U+2028, which splitlines would split.
                    n_rejected += data.count(b"\n")
                gathered.flush()
                os.fsync(gathered.fileno())
            os.replace(tmp, self.path / REJECTED)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
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
        atomic_write_json(self.path / MANIFEST, manifest)
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
    return None


def shard_problems(
    path: str | Path, manifest: dict[str, Any], *, checksum: bool = True
) -> list[str]:
    """Every way the shard files differ from the manifest (empty: none), one line each.

    A shard must be present, be the very file the run wrote (its sha256, and its size when the
    manifest records ``bytes``), be readable Parquet with the recorded row count and the core
    columns. A valid shard copied over another, or a truncated one, fails the checksum.
    ``checksum=False`` reads only each file's footer (for callers that need a schema only).
    """
    problems = []
    for shard in manifest["shards"]:
        name = shard["file"]
        file = Path(path) / name
        try:
            size = file.stat().st_size
            if not file.is_file():
                problems.append(f"{name}: not a file")
                continue
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
    return problems


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
