"""The lock of an output on an object store: one object created with a conditional write,
holding a lease that the run renews while it writes.

Object stores have no ``flock`` and no atomic rename, but they have conditional writes: S3
``If-None-Match: *`` creates an object only where none is (``If-Match: <etag>`` replaces only
the version read), GCS ``ifGenerationMatch=0`` / ``=<generation>`` the same. So:

- a run creates ``OUT/.lock`` only if absent; a second run finds it and is refused with one line
  naming the holder (host, pid) and the lease's end;
- the holder rewrites the lock every third of the lease, each time conditional on the version
  it wrote last: if that fails, another run has taken the lock over, and this run stops before
  its next write (:meth:`Lease.check`);
- a lock whose lease ended (its run was killed) is taken over with a write conditional on the
  version read, so of two runs racing for it exactly one wins; one line says so;
- the holder deletes the lock when it ends.

The lease's end is written by the holder's clock and read by the taker's: clocks further apart
than the lease would let a lock be taken early, so the lease (60 s, or
``PROFIT_PREP_LOCK_LEASE_S``) is long against usual skew (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from profit_prep.errors import InputError
from profit_prep.store.urls import describe, scheme

DEFAULT_LEASE_S = 60.0


def lease_seconds() -> float:
    value = os.environ.get("PROFIT_PREP_LOCK_LEASE_S")
    if not value:
        return DEFAULT_LEASE_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 1 <= seconds <= 86400:
        raise InputError(f"PROFIT_PREP_LOCK_LEASE_S={value!r}: give seconds between 1 and 86400")
    return seconds


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _precondition_failed(exc: BaseException) -> bool:
    """True when a conditional write was refused (the object exists, or is another version)."""
    if isinstance(exc, (FileExistsError, FileNotFoundError)):
        return True
    text = str(exc)
    return (getattr(exc, "errno", None) == errno.EINVAL or "Precondition" in text
            or "412" in text or "ConditionalRequestConflict" in text or "409" in text)


class _Conditional:
    """Conditional create / replace of one small object, and reading it with its version."""

    def __init__(self, fs: Any, key: str, kind: str) -> None:
        self.fs, self.key, self.kind = fs, key, kind
        self.bucket, _, self.name = key.partition("/")

    def create(self, body: bytes) -> str | None:
        """Write ``body`` only if no object is there; its version, or None when one was."""
        if self.kind == "s3":
            return self._s3_put(body, IfNoneMatch="*")
        try:
            self.fs.pipe_file(self.key, body, mode="create")
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        return self._version()

    def replace(self, body: bytes, version: str) -> str | None:
        """Write ``body`` only over the version ``version``; the new version, or None."""
        if self.kind == "s3":
            return self._s3_put(body, IfMatch=version)
        return self._gcs_replace(body, version)

    def read(self) -> tuple[bytes, str] | None:
        """The object and its version; None when absent. The version is read first: a replace
        conditional on it then fails if what was read is not the newest (never the reverse)."""
        try:
            version = self._version()
            return self.fs.cat_file(self.key), version
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key)

    def _version(self) -> str:
        self.fs.invalidate_cache(self.key)
        info = self.fs.info(self.key)
        if self.kind == "s3":
            return str(info["ETag"])
        return str(info["generation"])

    def _s3_put(self, body: bytes, **condition: str) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.name, Body=body,
                                  ContentType="application/json", **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        self.fs.invalidate_cache(self.key)
        return str(out["ETag"])

    def _gcs_replace(self, body: bytes, generation: str) -> str | None:
        from urllib.parse import quote

        # gcsfs has no replace-if-generation call: its media upload with the precondition
        # (a 412 surfaces as FileExistsError). Not run in this project's tests: their GCS server
        # (gcp-storage-emulator) reads an application/json body as JSON, not as object bytes.
        path = f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o"
        try:
            out = self.fs.call("POST", path, uploadType="media", name=self.name,
                               ifGenerationMatch=generation, data=body,
                               headers={"Content-Type": "application/json"}, json_out=True)
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise
        self.fs.invalidate_cache(self.key)
        return str(out["generation"])


class Lease:
    """``OUT/.lock`` on an object store, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, fs: Any, key: str, where: str, lease_s: float | None = None) -> None:
        kind = "s3" if scheme(where) in ("s3", "s3a") else "gs"
        self.store = _Conditional(fs, key, kind)
        self.where = where
        self.lease_s = lease_s if lease_s is not None else lease_seconds()
        self.run_id = secrets.token_hex(8)
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        now = time.time()
        return (json.dumps({"owner": self.owner, "run": self.run_id, "host": socket.gethostname(),
                            "pid": os.getpid(), "renewed": now, "expires": now + self.lease_s,
                            "lease_s": self.lease_s}, indent=1) + "\n").encode()

    def acquire(self) -> None:
        """Take the lock, or refuse in one line while another run's lease lasts."""
        for _ in range(5):
            version = self.store.create(self._body())
            if version is not None:
                return self._hold(version)
            found = self.store.read()
            if found is None:  # released between the two calls: try again
                continue
            raw, seen = found
            holder = _parse(raw)
            now = time.time()
            if holder is not None and holder["expires"] > now:
                raise InputError(
                    f"{self.where}: another run is writing here (lock held by "
                    f"{holder['owner']}, run {holder['run']}, lease until "
                    f"{_utc(holder['expires'])}, renewed while it runs); a run that was killed "
                    "is taken over once its lease ends")
            version = self.store.replace(self._body(), seen)
            if version is None:  # another run took it first: look again
                continue
            what = (f"the lock of {holder['owner']} (run {holder['run']}), whose lease ended "
                    f"{_utc(holder['expires'])}" if holder else "a damaged lock")
            print(f"note: {self.where}: took over {what}; that run stopped without releasing "
                  "it", file=sys.stderr)
            return self._hold(version)
        raise InputError(f"{self.where}: the lock kept changing hands while this run tried to "
                         "take it; another run is starting here: wait for it, or use another --out")

    def _hold(self, version: str) -> None:
        self.version = version
        self._thread = threading.Thread(target=self._renew_loop, name="profit-prep-lease",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as exc:  # a network blip: the next renewal tries again
                print(f"warning: {self.where}: could not renew the lock ({describe(exc)})",
                      file=sys.stderr)
            if self.lost:
                return

    def renew(self) -> None:
        with self._mutex:
            if self.lost or self.version is None:
                return
            version = self.store.replace(self._body(), self.version)
            if version is None:
                self.lost = True
            else:
                self.version = version

    def check(self) -> None:
        """Refuse to write on when the lock went to another run (our lease ran out)."""
        if self.lost:
            raise InputError(
                f"{self.where}: this run lost its lock (its lease ran out and another run took "
                "it over); stopped without writing more: rerun when that run has finished")

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._mutex:
            if self.lost or self.version is None:
                return
            found = self.store.read()
            holder = _parse(found[0]) if found else None
            if holder is not None and holder["run"] == self.run_id:
                self.store.delete()
            self.version = None


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A lock's contents, or None when it is not one profit-prep wrote (then it is stale)."""
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(holder, dict) or not isinstance(holder.get("expires"), (int, float))
            or not isinstance(holder.get("owner"), str) or not isinstance(holder.get("run"), str)):
        return None
    return holder
