"""Collators for plain PyTorch (and any trainer that takes a ``data_collator``).

Both take rows of :func:`profit_prep.training.loader.load` (``input_ids`` + ``completion_mask``, or
a
prebuilt ``labels``) and build causal-LM batches where ``labels[t] = input_ids[t]`` if token t is
kept, else -100 (the model shifts: logits at t-1 predict labels[t]). Padding is found from the row
lengths, never from ``input_ids == pad_token_id``: with SmolLM2 pad = eos = ``<|im_end|>``, which
is a trained token. Optional ``response_mask`` and ``weights`` columns are padded with 0 and passed
on (for :mod:`profit_prep.training.losses`).

* :class:`PadCollator`: right-padded ``(batch, longest)`` tensors plus ``attention_mask``.
* :class:`PackedCollator`: padding-free; all rows end to end in one ``(1, total)`` row with
  ``position_ids`` restarting at 0 per row (transformers then attends within each row only), and
  ``labels`` -100 on every row's first token, so no row learns to predict across a boundary. The
  same layout as TRL's ``DataCollatorForLanguageModeling(padding_free=True)``.

Truncation belongs to ``load(max_length=N)``, which cuts every per-token column together; the
collators' own ``max_length`` does the same for rows that come from elsewhere.

Example:
    >>> collate = PadCollator(pad_token_id=2)
    >>> batch = collate([{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
    ...                  {"input_ids": [8, 9], "completion_mask": [0, 1]}])
    >>> batch["labels"].tolist()
    [[-100, 6, 7], [-100, 9, -100]]
    >>> PackedCollator()([{"input_ids": [5, 6, 7], "completion_mask": [1, 1, 1]},
    ...                   {"input_ids": [8, 9], "completion_mask": [1, 1]}])["labels"].tolist()
    [[-100, 6, 7, -100, 9]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Row = Mapping[str, Any]
_PASS_THROUGH = {"response_mask": torch.long, "weights": torch.float32}


def _tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype)


def row_tensors(row: Row, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """One row's per-token tensors, truncated together: input_ids, labels, and pass-throughs."""
    ids = _tensor(row["input_ids"], torch.long)
    out = {"input_ids": ids}
    if "labels" in row and row["labels"] is not None:
        out["labels"] = _tensor(row["labels"], torch.long)
    else:
        out["labels"] = _tensor(row["completion_mask"], torch.bool)  # made labels below
    for name, dtype in _PASS_THROUGH.items():
        if name in row and row[name] is not None:
            out[name] = _tensor(row[name], dtype)
    if any(len(v) != len(ids) for v in out.values()):
        raise ValueError("per-token columns of a row differ in length (truncated separately?)")
    if out["labels"].dtype == torch.bool:
        out["labels"] = torch.where(out["labels"], ids, torch.full_like(ids, -100))
    if max_length is not None:
        out = {k: v[:max_length] for k, v in out.items()}
    return out


@dataclass
class PadCollator:
    """Right-padded batch: input_ids, attention_mask, labels (+ response_mask, weights)."""

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        parts = [row_tensors(r, self.max_length) for r in rows]
        width = max(len(p["input_ids"]) for p in parts)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "labels": -100}
        batch = {
            name: torch.full((len(parts), width), fill.get(name, 0), dtype=parts[0][name].dtype)
            for name in parts[0]
        }
        batch["attention_mask"] = torch.zeros((len(parts), width), dtype=torch.long)
        for i, p in enumerate(parts):
            n = len(p["input_ids"])
            for name, values in p.items():
                batch[name][i, :n] = values
            batch["attention_mask"][i, :n] = 1
        return batch


@dataclass
class PackedCollator:
    """Padding-free batch of shape (1, total tokens): input_ids, position_ids, labels (+ extras).

    Pass to the model without an attention mask and with ``use_cache=False``: transformers then
    derives the per-row causal blocks from the restarting ``position_ids`` (sdpa/eager build a
    block-diagonal mask; flash-attention uses the ``cu_seq_lens_*`` also returned here). With a
    KV cache it silently attends across rows.
    """

    max_length: int | None = None

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        parts = [row_tensors(r, self.max_length) for r in rows]
        lengths = torch.tensor([len(p["input_ids"]) for p in parts])
        batch: dict[str, Any] = {
            name: torch.cat([p[name] for p in parts])[None] for name in parts[0]
        }
        batch["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
        starts = batch["position_ids"] == 0
        # The last logit of row i would predict row i+1's first token: never a target
        batch["labels"] = batch["labels"].masked_fill(starts, -100)
        if "response_mask" in batch:
            batch["response_mask"] = batch["response_mask"].masked_fill(starts, 0)
        cu = torch.zeros(len(parts) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        return batch
