"""The output writer for object stores (``--out s3://bucket/run``, ``gs://...``).

The same folder layout, records, checks and public interface as the local ``OutputDir``,
built on what object stores guarantee instead of rename and ``flock``:

- every object is written by one PUT (or one completed multipart upload, for objects over
  100 MB): it appears whole or not at all, and nothing temporary is ever visible;
- a shard's rejected rows and record are written before its data object, which marks it done,
  and the manifest is written last;
- the lock is ``OUT/.lock``, created by a conditional write and held by a lease
  (:mod:`profit_prep.store.lease`);
- ``--overwrite`` deletes only objects at profit-prep's own names directly under ``OUT/``
  (never one outside it: ``run`` is not a prefix of ``run2/``).

Shards are scored and encoded exactly as for a local folder (``encode_shard``), so their bytes
are the same. Store errors become one line with credentials masked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from profit_prep.errors import InputError
from profit_prep.store.card import card_files, needs_rejected
from profit_prep.store.lease import Lease
from profit_prep.store.names import MANIFEST, OWN_IN, REJECTED, own_file, shard_name
from profit_prep.store.output_base import Output
from profit_prep.store.safe_files import sha256_bytes
from profit_prep.store.shard_files import (
    NO_RECORD,
    ManifestTotals,
    record_problem,
    shard_record,
)
from profit_prep.store.urls import describe, filesystem, redact, scheme

# Stores with conditional writes: the lock needs them.
WRITABLE = ("s3", "s3a", "gs", "gcs")

T = TypeVar("T")

# How long one listing of OUT/ answers "which objects are there" (see ObjectOutput._info).
_LISTING_S = 5.0


def _one_line_errors(method: Callable[..., T]) -> Callable[..., T]:
    """A store client's exception (network, permissions, a missing bucket) as one InputError
    line naming the output, with credentials masked."""

    @functools.wraps(method)
    def wrapper(self: ObjectOutput, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"--out {self.path}: {describe(exc)}") from None
    return wrapper


class ObjectOutput(Output):
    """An output under an object-store prefix being written by one run."""

    def __init__(self, url: str) -> None:
        kind = scheme(url)
        if kind not in WRITABLE:
            raise InputError(
                f"--out {redact(url)}: {kind}:// cannot hold a run's output (it has no "
                "conditional writes for the lock); write to a local folder, s3:// or gs://, "
                "and publish it with the store's own tool (for the Hub: hf upload)")
        super().__init__()
        self.fs, self.root = filesystem(url, "--out")
        self.path = f"{kind}://{self.root}"  # what summaries and errors print
        self._lease: Lease | None = None
        self._run_digest: tuple[str, str] | None = None
        self._listing: tuple[float, dict[str, dict[str, Any]]] | None = None

    # -- names --------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _url(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def _objects(self) -> dict[str, dict[str, Any]]:
        """Every object under ``OUT/`` (relative name -> info); ``OUT`` may be a bucket."""
        prefix = self.root + "/"
        found = self.fs.find(self.root, detail=True, withdirs=False)
        return {k[len(prefix):]: v for k, v in found.items()
                if k.startswith(prefix) and not k.endswith("/")}

    @staticmethod
    def _own(rel: str) -> bool:
        parts = rel.split("/")
        if len(parts) == 1:
            return own_file(None, parts[0])
        return len(parts) == 2 and parts[0] in OWN_IN and own_file(parts[0], parts[1])

    def _info(self, *parts: str) -> dict[str, Any] | None:
        """An object's listing entry (size, version): from one listing of ``OUT/`` reused for a
        few seconds, so checking N shards costs a few LIST calls, not 4N HEADs. What it
        vouches for is then read fresh (record, checksums); our own writes drop it."""
        now = time.monotonic()
        if self._listing is None or now - self._listing[0] > _LISTING_S:
            self._listing = (now, self._objects())
        return self._listing[1].get("/".join(parts))

    @staticmethod
    def _version(info: dict[str, Any] | None) -> tuple[Any, ...] | None:
        if info is None:
            return None
        return (info.get("size"), info.get("ETag") or info.get("generation") or info.get("md5Hash"),
                str(info.get("LastModified") or info.get("updated") or ""))

    @property
    def location(self) -> str:
        """What other processes (Ray's writer actor) reopen: the URL."""
        return self.path

    def _put(self, data: bytes | memoryview | pa.Buffer, *parts: str) -> None:
        if self._lease is not None:
            self._lease.check()
        self._listing = None
        # One PUT below 100 MB, else one multipart upload: visible only once complete.
        self.fs.pipe_file(self._key(*parts), bytes(memoryview(data)))

    # -- lifecycle ----------------------------------------------------------------------------

    @_one_line_errors
    def check_writable(self, overwrite: bool) -> None:
        """Fail now, before a model loads, if ``open`` would refuse this prefix."""
        objects = self._objects()
        marked = "run.json" in objects or MANIFEST in objects
        if not marked and any(rel != ".lock" for rel in objects):
            raise InputError(
                f"{self.path} is not empty and holds no profit-prep output (no run.json); "
                "profit-prep writes only under a new or empty prefix: choose another --out")
        foreign = sorted(rel for rel in objects if not self._own(rel))
        if foreign and overwrite:
            shown = ", ".join(foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise InputError(
                f"{self.path} holds objects profit-prep did not write ({redact(shown)}{more}); "
                "--overwrite removes only its own: move those, or choose another --out")

    @contextlib.contextmanager
    def open(self, params: dict[str, Any], *, overwrite: bool = False) -> Iterator[ObjectOutput]:
        """Take the lock and check (or record) the run's parameters; release it at the end."""
        self.check_writable(overwrite)
        lease = Lease(self.fs, self._key(".lock"), self.path)
        self._guarded(lease.acquire)
        self._lease = lease
        try:
            self.check_writable(overwrite)  # again under the lock
            self._prepare(params, overwrite)
            yield self
        finally:
            self._lease = None
            with contextlib.suppress(Exception):
                lease.release()

    @_one_line_errors
    def _guarded(self, call: Callable[[], T]) -> T:
        return call()

    @_one_line_errors
    def _prepare(self, params: dict[str, Any], overwrite: bool) -> None:
        objects = self._objects()
        if overwrite:
            self._abort_uploads()
            own = sorted(self._key(rel) for rel in objects if self._own(rel) and rel != ".lock")
            if own:
                self.fs.rm(own)
            self._listing = None
        elif "run.json" in objects:
            self._abort_uploads()
            previous = self._read_json("run.json", "the run's parameters",
                                       "use --overwrite to start this output again")
            if previous != params:
                changed = sorted(
                    k for k in set(previous) | set(params) if previous.get(k) != params.get(k))
                raise InputError(
                    f"{self.path} holds a run with other parameters ({', '.join(changed)} "
                    "differ); use another --out, or --overwrite to replace it")
            return
        elif any(rel != ".lock" for rel in objects):
            raise InputError(f"{self.path} holds an output without run.json (a damaged run); "
                             "use --overwrite to start it again, or another --out")
        self._put((json.dumps(params, indent=2) + "\n").encode(), "run.json")
        self._verdicts.clear()

    def _abort_uploads(self) -> None:
        """Abort multipart uploads to profit-prep's names left by a killed run (invisible, but
        billed): under the lock no other run of ours is uploading here."""
        if scheme(self.path) not in ("s3", "s3a"):
            return
        bucket, _, key = self.root.partition("/")
        prefix = f"{key}/" if key else ""
        try:
            listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        except Exception:  # a housekeeping step: a role without this permission still runs
            return
        for upload in listed.get("Uploads", []):
            if self._own(upload["Key"][len(prefix):]):
                with contextlib.suppress(Exception):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                    UploadId=upload["UploadId"])

    def _read_json(self, name: str, what: str, remedy: str) -> dict[str, Any]:
        try:
            value = json.loads(self.fs.cat_file(self._key(name)))
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise InputError(f"{self._url(name)} ({what}) is damaged; {remedy}")
        return value

    # -- shards -------------------------------------------------------------------------------

    @_one_line_errors
    def _verdict(self, index: int) -> tuple[str | None, dict[str, Any] | None]:
        name = shard_name(index)
        data = self._info("data", f"{name}.parquet")
        if data is None:
            return "", None
        key = (self._version(data), self._version(self._info("rejected", f"{name}.jsonl")),
               self._version(self._info("shards", f"{name}.json")),
               self._version(self._info("run.json")))
        cached = self._verdicts.get(index)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        try:
            problem, record = self._shard_problem(name, data)
        except FileNotFoundError:  # an object went away while it was read
            return "", None
        if problem:
            print(f"note: {self._url('data', name)}.parquet is not trusted ({problem}); scoring "
                  "that shard again", file=sys.stderr)
        self._verdicts[index] = (key, problem, record)
        return problem, record

    def _shard_problem(
        self, name: str, data: dict[str, Any]
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Why the finished-looking shard ``name`` is not the one this run wrote, or None (the
        same checks as a local folder's: record, run.json, sizes and checksums)."""
        try:
            raw = self.fs.cat_file(self._key("shards", f"{name}.json"))
        except FileNotFoundError:
            return NO_RECORD, None
        problem, record = record_problem(name, raw[: 1 << 16], self._run_json_digest())
        if problem or record is None:
            return problem, record
        if data["size"] != record["bytes"]:
            return f"{data['size']} bytes, its record says {record['bytes']}", record
        if sha256_bytes(self.fs.cat_file(self._key("data", f"{name}.parquet"))) != record["sha256"]:
            return "its checksum differs from its record (changed or replaced)", record
        try:
            rejected = self.fs.cat_file(self._key("rejected", f"{name}.jsonl"))
        except FileNotFoundError:
            return f"rejected/{name}.jsonl is missing", record
        if sha256_bytes(rejected) != record["rejected_sha256"]:
            return f"rejected/{name}.jsonl differs from its record", record
        return None, record

    def _run_json_digest(self) -> str:
        info = self._info("run.json")
        version = str(self._version(info))
        if self._run_digest is None or self._run_digest[0] != version:
            self._run_digest = (version, sha256_bytes(self.fs.cat_file(self._key("run.json"))))
        return self._run_digest[1]

    @_one_line_errors
    def input_digest(self, index: int) -> str | None:
        return super().input_digest(index)

    @_one_line_errors
    def _place_shard(self, name: str, data: pa.Buffer, lines: bytes, rows: int,
                     rejected_rows: int, input_digest: str | None) -> None:
        # Each object in one request; the same bytes as a local folder gets.
        record = shard_record(data, lines, rows, rejected_rows, input_digest,
                              self._run_json_digest())
        self._put(lines, "rejected", f"{name}.jsonl")
        self._put((json.dumps(record) + "\n").encode(), "shards", f"{name}.json")
        self._put(data, "data", f"{name}.parquet")

    # -- finish -------------------------------------------------------------------------------

    @_one_line_errors
    def finalize(
        self, manifest: dict[str, Any], n_shards: int, end_of_turn_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Check every shard against its record, gather the rejected rows (spooled through a
        local temporary file, so memory does not grow with them) and write the manifest last."""
        totals = ManifestTotals(end_of_turn_ids)
        self._listing = None  # shards were written meanwhile (by Ray's writer actor, too)
        with tempfile.TemporaryDirectory(prefix="profit-prep-") as spool:
            gathered_path = f"{spool}/{REJECTED}"
            with open(gathered_path, "wb") as gathered:
                for index in range(n_shards):
                    name, figures, lines = self._finished_shard(index, end_of_turn_ids)
                    totals.add(name, figures, lines)
                    gathered.write(lines)
            if self._lease is not None:
                self._lease.check()
            # One PUT, or one multipart upload for a large file: whole or nothing.
            self.fs.put_file(gathered_path, self._key(REJECTED))
            manifest = totals.manifest(manifest)
            self._put((json.dumps(manifest, indent=2) + "\n").encode(), MANIFEST)
            # After the manifest, as in a folder: the dataset card of a finished run.
            rejected = Path(gathered_path).read_bytes() if needs_rejected(manifest) else None
            for name, data in card_files(manifest, rejected):
                self._put(data, name)
        return manifest


    def _open_file(self, folder: str, name: str, handle: Any) -> Any:
        return self.fs.open(self._key(*filter(None, (folder, name))), "rb")

    def _shown(self, folder: str, name: str) -> str:
        return self._url(folder, name)


def read_run_params(url: str) -> dict[str, Any]:
    """The parameters an output under ``url`` was started with ({} when none or damaged);
    a URL the writer refuses (credentials in it, a store without conditional writes) is
    refused here already."""
    out = ObjectOutput(url)
    try:
        params = json.loads(out.fs.cat_file(out._key("run.json")))
    except Exception:  # none yet, damaged, or an unreachable store: the writer says which
        return {}
    return params if isinstance(params, dict) else {}
