"""The Parquet data contract between scoring and everything after it (docs/format.md).

One row per scored example. Per-token columns are Arrow lists of equal length within a row, all
aligned to ``input_ids``. New per-token signals (entropy, top-1 token, a second model's
log-probabilities) join as extra list columns; readers select the columns they need and ignore the
rest, and the manifest's ``columns`` lists what a given output holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1

# Core columns, always present, in this order.
SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_response", pa.int32(), nullable=False),
        pa.field("n_kept", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("n_original_tokens", pa.int32(), nullable=False),
    ]
)

COLUMN_DOCS = {
    "example_id": "stable id: the source row index, or the user's id column, as a string",
    "source_index": "0-based row position in the input",
    "input_ids": "token ids of the rendered conversation, as the trainer's tokenizer makes them",
    "response_mask": "True on tokens the trainer trains on (assistant content + end-of-turn)",
    "logprobs": "log p(input_ids[t] | input_ids[:t]) under the reference model; NaN at t = 0",
    "loss_mask": "response_mask & strategy(exp(logprobs)) at scoring time",
    "n_tokens": "len(input_ids)",
    "n_response": "sum(response_mask)",
    "n_kept": "sum(loss_mask)",
    "truncated": "the rendered row was longer than max_length and was cut",
    "n_original_tokens": "token count before truncation",
}

# Optional per-token signals (``--signals``), described in the manifest only when present.
SIGNAL_DOCS = {
    "entropy": "entropy (nats) of the reference distribution that predicted token t, exact over "
    "the full vocabulary; NaN at t = 0",
    "top1_id": "the reference model's most likely token at position t; -1 at t = 0",
    "top1_logprob": "log-probability of top1_id; NaN at t = 0",
    "rank": "rank of input_ids[t] in that distribution (1 = most likely; 1 + tokens with a "
    "strictly larger logit); -1 at t = 0",
}


@dataclass
class ScoredExample:
    example_id: str
    source_index: int
    input_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    loss_mask: np.ndarray
    truncated: bool
    n_original_tokens: int
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # optional per-token signals


def _list_array(values: Sequence[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """Build a list column from numpy arrays without a Python-level loop over tokens."""
    lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values) if len(values) else np.empty(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def to_table(examples: Sequence[ScoredExample]) -> pa.Table:
    """Arrow table in :data:`SCHEMA` order (plus any extra per-token columns, sorted by name)."""
    columns = {
        "example_id": pa.array([e.example_id for e in examples], pa.string()),
        "source_index": pa.array([e.source_index for e in examples], pa.int64()),
        "input_ids": _list_array([e.input_ids for e in examples], pa.int32()),
        "response_mask": _list_array([e.response_mask for e in examples], pa.bool_()),
        "logprobs": _list_array([e.logprobs for e in examples], pa.float32()),
        "loss_mask": _list_array([e.loss_mask for e in examples], pa.bool_()),
        "n_tokens": pa.array([len(e.input_ids) for e in examples], pa.int32()),
        "n_response": pa.array([int(e.response_mask.sum()) for e in examples], pa.int32()),
        "n_kept": pa.array([int(e.loss_mask.sum()) for e in examples], pa.int32()),
        "truncated": pa.array([e.truncated for e in examples], pa.bool_()),
        "n_original_tokens": pa.array([e.n_original_tokens for e in examples], pa.int32()),
    }
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    extra_names = sorted({k for e in examples for k in e.extra})
    for name in extra_names:
        values = [e.extra[name] for e in examples]
        arr = _list_array(values, pa.from_numpy_dtype(values[0].dtype))
        table = table.append_column(name, arr)
    return table


def flat_list(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values end to end, offsets from 0): the one way every reader turns
    per-token columns into flat numpy arrays (honours slicing; copies only when it must)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    return arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]
