"""Which writer an ``--out`` gets: a local folder (``OutputDir``) or an object-store prefix
(``ObjectOutput``); both have the same interface (open, check_writable, all_done, shard_done,
input_digest, write_shard, finalize, path, location)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from profit_prep.store.urls import is_url
from profit_prep.store.writer import OutputDir


class Output(Protocol):
    """What an executor writes through, wherever the output lives."""

    path: Any  # a Path for a folder, the URL for an object store

    @property
    def location(self) -> str:
        """Where another process (Ray's writer actor) reopens this output."""
        ...

    def check_writable(self, overwrite: bool) -> None: ...

    def open(self, params: dict[str, Any], *,
             overwrite: bool = False) -> AbstractContextManager[Any]: ...

    def all_done(self, n_shards: int) -> bool: ...

    def shard_done(self, index: int) -> bool: ...

    def input_digest(self, index: int) -> str | None: ...

    def write_shard(self, index: int, table: pa.Table, rejected: list[dict[str, Any]],
                    input_digest: str | None = None,
                    end_of_turn_ids: Sequence[int] | None = None,
                    formats: Sequence[str | None] | None = None) -> None: ...

    def finalize(self, manifest: dict[str, Any], n_shards: int,
                 end_of_turn_ids: list[int] | None = None) -> dict[str, Any]: ...


def open_output(out: str | Path) -> Output:
    """The writer for ``out``: URLs (s3://, gs://) go to the object-store writer, whose
    clients are imported only then."""
    if is_url(str(out)):
        from profit_prep.store.objects import ObjectOutput

        return ObjectOutput(str(out))
    return OutputDir(out)


def read_run_params(out: str | Path) -> dict[str, Any]:
    """The parameters an output at ``out`` was started with; {} for none (or a damaged one:
    the writer says so in one line when the run opens it)."""
    if is_url(str(out)):
        from profit_prep.store.objects import read_run_params as read_remote

        return read_remote(str(out))
    try:
        params = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}
