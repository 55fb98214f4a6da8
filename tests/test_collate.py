"""Collators: labels follow the masks, padding never hides a trained token, packed == padded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from profit_prep.training.collate import PackedCollator, PadCollator


def make_rows(n: int = 4, seed: int = 0, vocab: int = 49152) -> list[dict]:
    """Rows shaped like load(..., response_mask=True, weights="prob"): prompt, then response."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(8, 30))
        prompt = int(rng.integers(2, length - 2))
        response = (np.arange(length) >= prompt).astype(np.int8)
        keep = response & (rng.random(length) < 0.6)
        rows.append({
            "example_id": str(i),
            "input_ids": rng.integers(3, vocab, length).tolist(),
            "completion_mask": keep.tolist(),
            "response_mask": response.tolist(),
            "weights": np.where(response, rng.random(length), 0).astype(np.float32).tolist(),
        })
    return rows


def test_pad_collator_labels_follow_mask_not_pad_id() -> None:
    rows = make_rows()
    # Make the pad id a token that is kept in training (SmolLM2: pad = eos = <|im_end|>)
    pad = rows[0]["input_ids"][int(np.argmax(rows[0]["completion_mask"]))]
    rows[1]["input_ids"][-1], rows[1]["completion_mask"][-1] = pad, 1
    batch = PadCollator(pad_token_id=pad)(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(rows), width)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids, keep = np.array(r["input_ids"]), np.array(r["completion_mask"], bool)
        np.testing.assert_array_equal(batch["labels"][i, :n].numpy(), np.where(keep, ids, -100))
        assert (batch["labels"][i, n:] == -100).all()
        assert (batch["input_ids"][i, n:] == pad).all()
        np.testing.assert_array_equal(batch["attention_mask"][i].numpy(), np.arange(width) < n)
        np.testing.assert_array_equal(batch["response_mask"][i, :n].numpy(), r["response_mask"])
        assert (batch["response_mask"][i, n:] == 0).all() and (batch["weights"][i, n:] == 0).all()
        np.testing.assert_allclose(batch["weights"][i, :n].numpy(), r["weights"])
    assert batch["labels"][1, len(rows[1]["input_ids"]) - 1] == pad  # trained, though == pad id


def test_pad_collator_prebuilt_labels_truncation_and_bad_rows() -> None:
    rows = make_rows(2)
    rows[0]["labels"] = [7] * len(rows[0]["input_ids"])
    batch = PadCollator(pad_token_id=0, max_length=6, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, :6].tolist() == [7] * 6 and (batch["labels"][:, 6:] == -100).all()
    for i, r in enumerate(rows):
        assert batch["input_ids"][i, :6].tolist() == r["input_ids"][:6]
        assert batch["response_mask"][i, :6].tolist() == r["response_mask"][:6]
    rows[1]["completion_mask"] = rows[1]["completion_mask"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        PadCollator()(rows)


def test_packed_collator_layout() -> None:
    rows = make_rows(3)
    for r in rows:  # every token kept: the only -100 labels left are the row starts
        r["completion_mask"] = [1] * len(r["input_ids"])
    batch = PackedCollator()(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    starts = np.cumsum([0, *lengths[:-1]])
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == sum((r["input_ids"] for r in rows), [])
    expect_pos = np.concatenate([np.arange(n) for n in lengths])
    np.testing.assert_array_equal(batch["position_ids"][0].numpy(), expect_pos)
    assert set(np.flatnonzero(batch["labels"][0].numpy() == -100)) == set(starts)
    assert batch["cu_seq_lens_q"].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert batch["max_length_q"] == max(lengths)
    assert "attention_mask" not in batch


def test_packed_equals_padded_on_a_real_model(tiny_model_dir: Path) -> None:
    """Same logits per row and the same loss: rows in a pack do not see each other."""
    from transformers import AutoModelForCausalLM

    from profit_prep.training.losses import profit_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    rows = make_rows(3, seed=1)
    padded, packed = PadCollator(pad_token_id=2)(rows), PackedCollator()(rows)
    with torch.no_grad():
        out_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
        # use_cache=False: with a cache, transformers ignores the row boundaries in position_ids
        out_pack = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         use_cache=False)
    offset = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        torch.testing.assert_close(out_pack.logits[0, offset:offset + n], out_pad.logits[i, :n],
                                   atol=1e-4, rtol=1e-4)
        offset += n
    for normalize in ("kept", "response"):
        a = profit_loss(out_pad, padded["labels"], padded["response_mask"], normalize=normalize)
        b = profit_loss(out_pack, packed["labels"], packed["response_mask"], normalize=normalize)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
