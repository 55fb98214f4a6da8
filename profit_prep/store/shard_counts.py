"""A shard's counts: what each shard's Parquet footer carries and the manifest sums."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - registers pa.compute
import pyarrow.parquet as pq

from profit_prep.rules.profit import end_of_turn_tokens
from profit_prep.store.schema import flat_list

# Per-row stat column -> the manifest count that sums it.
SUMMED = {
    "n_tokens": "tokens",
    "n_response": "response_tokens",
    "n_kept": "kept_tokens",
    "truncated": "truncated_rows",
}
# Parquet footer key of a shard: the hash of the input rows it was made from.
INPUT_DIGEST_KEY = b"profit_prep.input_digest"
# Parquet footer key of a shard: its counts (JSON), so finalize reads footers, not columns.
SHARD_COUNTS_KEY = b"profit_prep.counts"


def end_of_turn_counts(
    source: Path | BinaryIO | pa.Table, end_of_turn_ids: Sequence[int]
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
        key: int(pa.compute.sum(table[column]).as_py() or 0) for column, key in SUMMED.items()
    }
    if end_of_turn_ids is not None:
        total, masked = end_of_turn_counts(table, end_of_turn_ids)
        counts["end_of_turn"] = {"ids": [int(i) for i in end_of_turn_ids], "tokens": total,
                                 "masked": masked}
    if formats is not None:
        counts["formats"] = dict(sorted(Counter(f for f in formats if f).items()))
    return counts


def stored_counts(meta: pq.FileMetaData) -> dict[str, Any] | None:
    """The counts a shard's footer holds (None for shards written before they were kept)."""
    raw = (meta.schema.to_arrow_schema().metadata or {}).get(SHARD_COUNTS_KEY)
    if not raw:
        return None
    try:
        counts = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in SUMMED.values())
    return counts if ok else None

