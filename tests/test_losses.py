"""ProFit losses against independent computations, and the normalisation inside HF Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from profit_prep.collate import PadCollator
from profit_prep.losses import profit_loss, weighted_profit_loss
from tests.test_collate import make_rows


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def per_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(token t | < t) at every t >= 1, by log_softmax + gather (not cross_entropy)."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, input_ids[:, 1:, None])[..., 0]


def test_losses_match_direct_sums(model) -> None:
    batch = PadCollator(pad_token_id=2)(make_rows(4, seed=3))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    nll = per_token_nll(out.logits, batch["input_ids"])
    kept = batch["labels"][:, 1:] != -100
    response = batch["response_mask"][:, 1:].bool()
    w = batch["weights"][:, 1:].double()
    assert kept.sum() < response.sum()  # the mask really drops response tokens

    kept_loss = profit_loss(out, batch["labels"])
    torch.testing.assert_close(kept_loss.double(), nll[kept].sum() / kept.sum())
    torch.testing.assert_close(kept_loss, out.loss)  # = the model's own -100 label loss
    torch.testing.assert_close(
        profit_loss(out.logits, batch["labels"], batch["response_mask"], normalize="response")
        .double(), nll[kept].sum() / response.sum())
    torch.testing.assert_close(
        weighted_profit_loss(out, batch["labels"], batch["weights"]).double(),
        (w * nll)[kept].sum() / kept.sum())
    torch.testing.assert_close(
        weighted_profit_loss(out, batch["labels"], batch["weights"], batch["response_mask"],
                             normalize="response").double(),
        (w * nll)[kept].sum() / response.sum())
    with pytest.raises(ValueError, match="response_mask"):
        profit_loss(out, batch["labels"], normalize="response")


def test_micro_batches_with_global_count_sum_to_full_batch(model) -> None:
    rows = make_rows(4, seed=4)
    collate = PadCollator(pad_token_id=2)
    full, parts = collate(rows), [collate(rows[:2]), collate(rows[2:])]
    with torch.no_grad():
        logits = lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])  # noqa: E731
        for normalize, key in (("kept", "labels"), ("response", "response_mask")):
            count = sum(int((p[key][:, 1:] != (-100 if key == "labels" else 0)).sum())
                        for p in parts)
            whole = profit_loss(logits(full), full["labels"], full["response_mask"],
                                normalize=normalize)
            summed = sum(profit_loss(logits(p), p["labels"], p["response_mask"], count, normalize)
                         for p in parts)
            torch.testing.assert_close(summed, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["kept", "response"])
def test_trainer_mixin_gradient_accumulation(
    normalize: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One SGD step of Trainer (2 micro-batches x GA 2) == one step on the full-batch loss.

    A wrong denominator across accumulation (per micro-batch, or kept instead of response
    tokens) moves the weights by a different amount and fails this.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from profit_prep.losses import ProFitLossMixin

    class ProFitTrainer(ProFitLossMixin, Trainer):
        profit_normalize = normalize

    rows = make_rows(4, seed=5)
    lr = 0.5
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=lr, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="no", remove_unused_columns=False, bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ProFitTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            data_collator=PadCollator(pad_token_id=2))
    trainer.train()

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    full = PadCollator(pad_token_id=2)(rows)
    out = reference(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    # the rows carry weights, and the mixin applies them
    profit_loss(out, full["labels"], full["response_mask"], normalize=normalize,
                weights=full["weights"]).backward()
    moved = 0
    for name, p in reference.named_parameters():
        expect = start[name] - lr * p.grad
        got = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(got, expect, atol=2e-6, rtol=1e-4)
        moved += not torch.equal(got, start[name])
    assert moved > 0
    # the normalisations really differ on this data
    other = "response" if normalize == "kept" else "kept"
    with torch.no_grad():
        a = profit_loss(out, full["labels"], full["response_mask"], normalize=normalize)
        b = profit_loss(out, full["labels"], full["response_mask"], normalize=other)
    assert not np.isclose(a.item(), b.item())
