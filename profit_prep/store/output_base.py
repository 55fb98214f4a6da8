"""What every writer of an output shares, wherever its files go (a folder, an object store):
the interface executors write through, and the parts that do not depend on the store.

A shard is written in one order everywhere: its rejected rows, its record, then its data, whose
appearance marks the shard done (:meth:`Output.write_shard`). Where and how each file lands is
the writer's own :meth:`Output._place_shard`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import pyarrow as pa

from profit_prep.store.names import shard_name
from profit_prep.store.shard_files import encode_shard


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

    @abstractmethod
    def input_digest(self, index: int) -> str | None:
        """The input digest a finished shard was scored from (None when not known)."""

    @abstractmethod
    def _place_shard(self, name: str, data: pa.Buffer, lines: bytes, rows: int,
                     rejected_rows: int, input_digest: str | None) -> None:
        """Put a shard's rejected rows, record and data, in that order, each whole or not."""

    @abstractmethod
    def finalize(self, manifest: dict[str, Any], n_shards: int,
                 end_of_turn_ids: list[int] | None = None) -> dict[str, Any]:
        """Check every shard, gather the rejected rows and write the manifest last."""

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
