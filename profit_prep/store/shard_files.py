"""A shard's files, store-independent: its Parquet bytes and rejected rows, its record in
``shards/``, the figures ``finalize`` reads from its footer and the manifest's totals.

Both writers (:class:`profit_prep.store.writer.OutputDir` on a local folder,
:class:`profit_prep.store.objects.ObjectOutput` on an object store) build the same bytes here,
so a run gives byte-identical shards wherever it writes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.store.safe_files import sha256_bytes, sha256_stream
from profit_prep.store.schema import FORMAT_VERSION, SCHEMA
from profit_prep.store.shard_counts import (
    INPUT_DIGEST_KEY,
    SHARD_COUNTS_KEY,
    SUMMED,
    end_of_turn_counts,
    shard_counts,
    stored_counts,
)

# What a shard record (shards/part-N.json) holds.
RECORD_KEYS = ("sha256", "bytes", "rows", "rejected_sha256", "run")


# Why a finished-looking shard is not trusted (``_shard_problem``); NO_RECORD: an older
# profit-prep wrote it, or something other than a run put it there.
NO_RECORD = "it has no record in shards/ (written by an older profit-prep, or not by this run)"


def encode_shard(
    table: pa.Table,
    rejected: list[dict[str, Any]],
    input_digest: str | None = None,
    end_of_turn_ids: Sequence[int] | None = None,
    formats: Sequence[str | None] | None = None,
) -> tuple[pa.Buffer, bytes]:
    """A shard's Parquet bytes and its rejected rows' JSONL: the same bytes on every store.

    ``input_digest`` (a hash of the shard's input rows) goes into the Parquet footer, so a
    resumed run can tell whether the input changed since (docs/format.md). So do the shard's
    counts (:func:`shard_counts`; ``formats``: each scored row's input format), so that
    ``finalize`` reads footers only, however large the output.
    """
    metadata = dict(table.schema.metadata or {})
    if input_digest is not None:
        metadata[INPUT_DIGEST_KEY] = input_digest.encode()
    counts = shard_counts(table, end_of_turn_ids, formats)
    metadata[SHARD_COUNTS_KEY] = json.dumps(counts, separators=(",", ":")).encode()
    table = table.replace_schema_metadata(metadata)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode()
    # Float columns (logprobs and any later signal) compress ~1.6x better split by byte
    # plane; dictionary encoding would take precedence over that, so it is kept for the id
    # column alone. Measured on GSM8K: 6.3 -> 4.7 bytes per token. Written to memory first
    # (a few MB per shard) so its checksum is known before the file appears.
    floats = [f.name for f in table.schema
              if pa.types.is_floating(getattr(f.type, "value_type", f.type))]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=["example_id"],
                   use_byte_stream_split=floats)
    return sink.getvalue(), lines


def shard_record(data: pa.Buffer, lines: bytes, rows: int, rejected_rows: int,
                 input_digest: str | None, run_digest: str) -> dict[str, Any]:
    """A shard's record (``shards/part-N.json``): checksums of both files, its rows, and the
    digest of the ``run.json`` it was written under; what a resume checks before trusting it."""
    return {"sha256": sha256_bytes(data), "bytes": data.size, "rows": rows,
            "rejected_sha256": sha256_bytes(lines), "rejected_rows": rejected_rows,
            "input_digest": input_digest, "run": run_digest}


def record_problem(
    name: str, raw: bytes, run_digest: str
) -> tuple[str | None, dict[str, Any] | None]:
    """Why a shard record's bytes cannot vouch for a shard of the run whose ``run.json`` has
    ``run_digest`` (None when they can), and the record."""
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
        return f"its record shards/{name}.json is damaged", None
    if record["run"] != run_digest:
        return "its record names another run's run.json", record
    return None, record


def footer_figures(
    f: Any, end_of_turn_ids: Sequence[int] | None, record: dict[str, Any] | None
) -> tuple[int, dict[str, Any], str, tuple[int, int] | None]:
    """A finished shard's rows, footer counts, sha256 and (with ``end_of_turn_ids``) end-of-turn
    tokens and how many were masked, from its open (seekable) Parquet file."""
    eot = None
    meta = pq.read_metadata(f)
    stored = stored_counts(meta)
    if stored is None:  # a shard from before counts were kept in footers
        f.seek(0)
        stored = shard_counts(pq.read_table(f, columns=list(SUMMED)))
    if end_of_turn_ids is not None:
        kept = stored.get("end_of_turn") or {}
        if kept.get("ids") == list(end_of_turn_ids):
            eot = int(kept["tokens"]), int(kept["masked"])
        else:
            f.seek(0)
            eot = end_of_turn_counts(f, end_of_turn_ids)
    if record is None:
        f.seek(0)
        digest = sha256_stream(f)
    else:
        digest = record["sha256"]
    return meta.num_rows, stored, digest, eot


class ManifestTotals:
    """What ``finalize`` sums over the shards, and the manifest it writes last."""

    def __init__(self, end_of_turn_ids: Sequence[int] | None) -> None:
        self.shards: list[dict[str, Any]] = []
        self.counts = dict.fromkeys(["scored_rows", *SUMMED.values()], 0)
        if end_of_turn_ids is not None:
            self.counts.update(end_of_turn_tokens=0, end_of_turn_masked=0)
        self.formats: Counter[str] | None = Counter()
        self.n_rejected = 0

    def add(self, name: str, figures: tuple[int, dict[str, Any], str, tuple[int, int] | None],
            rejected: bytes) -> None:
        rows, stored, digest, eot = figures
        self.counts["scored_rows"] += rows
        for key in SUMMED.values():
            self.counts[key] += stored[key]
        if eot is not None:
            self.counts["end_of_turn_tokens"] += eot[0]
            self.counts["end_of_turn_masked"] += eot[1]
        if self.formats is not None and isinstance(stored.get("formats"), dict):
            self.formats.update(stored["formats"])
        else:
            self.formats = None  # unknown for some shard: not claimed for any
        self.shards.append({"file": f"data/{name}.parquet", "rows": rows, "sha256": digest})
        # Count "\n" alone: a reason may hold U+2028, which splitlines would split.
        self.n_rejected += rejected.count(b"\n")

    def manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        counts = {**self.counts, "rejected_rows": self.n_rejected}
        if self.formats and isinstance(manifest.get("render"), dict):
            manifest = {**manifest,
                        "render": {**manifest["render"], "formats": dict(self.formats)}}
        return {
            "format_version": FORMAT_VERSION,
            **manifest,
            "counts": counts,
            "shards": self.shards,
            "schema": [f.name for f in SCHEMA],
        }


def rejected_with_newline(data: bytes) -> bytes:
    """A shard's rejected rows, ending in a newline when there are any."""
    return data + b"\n" if data and not data.endswith(b"\n") else data
