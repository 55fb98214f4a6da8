"""What every writer of an output shares, wherever its files go (a folder, an object store):
the interface executors write through, and the parts that do not depend on the store.

A shard is written in one order everywhere: its rejected rows, its record, then its data, whose
appearance marks the shard done (:meth:`Output.write_shard`). Where and how each file lands is
the writer's own :meth:`Output._place_shard`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.store.names import MANIFEST, shard_name
from profit_prep.store.shard_counts import INPUT_DIGEST_KEY
from profit_prep.store.shard_files import (
    NO_RECORD,
    encode_shard,
    footer_figures,
    rejected_with_newline,
)
from profit_prep.store.urls import describe

# What every "this shard cannot go into the manifest" line ends with.
_RERUN = "rerun the same command: it scores that shard again (finished shards are kept)"


class Output(ABC):
    """An output being written by one run: lock it (:meth:`open`), skip the shards already
    done, write the others, and write the manifest last (:meth:`finalize`)."""

    path: Any  # a Path for a folder; the URL for an object store (what summaries print)

    def __init__(self) -> None:
        # Shard index -> (what the verdict was drawn from, problem or None, record): reused
        # while unchanged, since all_done and pending ask about every shard.
        self._verdicts: dict[int, tuple[Any, str | None, dict[str, Any] | None]] = {}

    @property
    @abstractmethod
    def location(self) -> str:
        """Where another process (Ray's writer actor) reopens this output."""

    @abstractmethod
    def check_writable(self, overwrite: bool) -> None:
        """Refuse, before any model loads, an output this run may not write to."""

    @abstractmethod
    def open(self, params: dict[str, Any], *,
             overwrite: bool = False) -> AbstractContextManager[Any]:
        """Lock the output for this run (``params``: what ``run.json`` records)."""

    @abstractmethod
    def _verdict(self, index: int) -> tuple[str | None, dict[str, Any] | None]:
        """(None, record) for a finished, trusted shard; ("", None) for one not written; else
        (why it is not trusted, record)."""

    def input_digest(self, index: int) -> str | None:
        """The input digest a finished shard was scored from: its record's, else its footer's
        (None for outputs that predate it)."""
        problem, record = self._verdict(index)
        if problem is None and record is not None and "input_digest" in record:
            return record["input_digest"]
        name = f"{shard_name(index)}.parquet"
        try:
            with self._open_file("data", name, None) as f:
                metadata = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self._shown('data', name)} is damaged ({describe(exc)}); "
                             "delete it and rerun to score that shard again") from None
        value = metadata.get(INPUT_DIGEST_KEY)
        return value.decode() if value else None

    @abstractmethod
    def _place_shard(self, name: str, data: pa.Buffer, lines: bytes, rows: int,
                     rejected_rows: int, input_digest: str | None) -> None:
        """Put a shard's rejected rows, record and data, in that order, each whole or not."""

    @abstractmethod
    def finalize(self, manifest: dict[str, Any], n_shards: int,
                 end_of_turn_ids: list[int] | None = None) -> dict[str, Any]:
        """Check every shard, gather the rejected rows and write the manifest last."""

    @abstractmethod
    def _open_file(self, folder: str, name: str,
                   handle: Any) -> AbstractContextManager[BinaryIO]:
        """``OUT/folder/name`` (``OUT/name`` for folder "") open for reading
        (FileNotFoundError when missing); ``handle``: what the writer's :meth:`finalize` holds
        open meanwhile (a folder's descriptors), or None."""

    @abstractmethod
    def _shown(self, folder: str, name: str) -> str:
        """``OUT/folder/name`` as an error line names it."""

    def _finished_shard(
        self, index: int, end_of_turn_ids: list[int] | None, handle: Any = None
    ) -> tuple[str, tuple[int, dict[str, Any], str, tuple[int, int] | None], bytes]:
        """A finished shard's name, footer figures (:func:`footer_figures`) and rejected lines,
        for :meth:`finalize`; refused when it changed since it was written."""
        name = shard_name(index)
        problem, record = self._verdict(index)
        if problem not in (None, NO_RECORD):  # NO_RECORD: shards of older versions
            raise InputError(f"{self._shown('data', f'{name}.parquet')}: "
                             f"{problem or 'missing'}; {_RERUN}")
        with self._open_file("data", f"{name}.parquet", handle) as f:
            figures = footer_figures(f, end_of_turn_ids, record)
        try:
            with self._open_file("rejected", f"{name}.jsonl", handle) as f:
                lines = rejected_with_newline(f.read())
        except FileNotFoundError:
            raise InputError(f"{self._shown('rejected', f'{name}.jsonl')} is missing; "
                             f"{_RERUN}") from None
        return name, figures, lines

    def earlier_scorer(self) -> dict[str, Any] | None:
        """The ``scorer`` section of the manifest an earlier run here finished with, or None.

        A rerun with nothing left to score loads no model, so it keeps this description
        (dtype, device, engine) rather than write one that says only the backend's name.
        """
        try:
            with self._open_file("", MANIFEST, None) as f:
                scorer = json.loads(f.read()).get("scorer")
        except (OSError, ValueError, AttributeError):  # none, unreadable or damaged: no claim
            return None
        return scorer if isinstance(scorer, dict) else None

    def shard_done(self, index: int) -> bool:
        """True when shard ``index`` is finished and its record vouches for its bytes."""
        return self._verdict(index)[0] is None

    def all_done(self, n_shards: int) -> bool:
        return all(self.shard_done(i) for i in range(n_shards))

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
        shard's counts (``formats``: each scored row's input format), so that :meth:`finalize`
        reads footers only, however large the output. The record (``shards/part-N.json``:
        checksums of both files, rows, this run's ``run.json``) is what a resume checks before
        it trusts the shard. The bytes are the same on every store.
        """
        data, lines = encode_shard(table, rejected, input_digest, end_of_turn_ids, formats)
        self._place_shard(shard_name(index), data, lines, table.num_rows, len(rejected),
                          input_digest)
        self._verdicts.pop(index, None)
