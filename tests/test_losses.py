"""ProFit losses against independent computations, and the normalisation inside HF Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from profit_prep.training.collate import PadCollator
from profit_prep.training.losses import profit_loss, weighted_profit_loss
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

    from profit_prep.training.losses import ProFitLossMixin

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


# -- other methods' masks and weights inside a real SFTTrainer ------------------------------------


def _stored(out: Path) -> dict[str, dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "data")
    return {r["example_id"]: {k: np.array(r[k], dtype=float if k == "logprobs" else None)
                              for k in ("input_ids", "response_mask", "logprobs", "loss_mask")}
            for r in table.to_pylist()}


@pytest.mark.slow
def test_sft_trainer_dft_weights_and_rho1_mask_reach_the_loss(
    scored_output: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """DFT: each token's gradient is exactly p_ref times the unweighted one. Rho-1: exactly the
    numpy top-60% excess-loss tokens get gradient, everything else none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from profit_prep.rules.selection import Select
    from profit_prep.training.loader import load
    from profit_prep.training.losses import ProFitLossMixin
    from tests.conftest import final_hidden_grads, score_demo

    class ProFitSFTTrainer(ProFitLossMixin, SFTTrainer):
        pass

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def trainer_for(dataset: Any, name: str) -> SFTTrainer:
        torch.manual_seed(0)
        args = SFTConfig(
            output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4,
            bf16=False, use_cpu=True, report_to=[], save_strategy="no", learning_rate=1e-2,
            seed=0, shuffle_dataset=False, remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        return ProFitSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                args=args, train_dataset=dataset, processing_class=tokenizer,
                                data_collator=PadCollator(pad_token_id=2))

    def first_batch(trainer: SFTTrainer) -> tuple[list[str], dict]:
        rows = [trainer.train_dataset[i] for i in range(4)]
        return [r["example_id"] for r in rows], trainer.data_collator(rows)

    stored = _stored(scored_output)

    # DFT: all response tokens, weight p_ref (detached constants).
    plain = trainer_for(load(scored_output, tau=0.0), "plain")
    dft = trainer_for(load(scored_output, tau=0.0, weights="prob"), "dft")
    ids, batch_plain = first_batch(plain)
    _, batch_dft = first_batch(dft)
    assert torch.equal(batch_plain["labels"], batch_dft["labels"])
    weights = batch_dft["weights"]
    for i, eid in enumerate(ids):
        r = stored[eid]
        n = len(r["input_ids"])
        expect = np.where(r["response_mask"] == 1, np.exp(r["logprobs"]), 0.0)
        np.testing.assert_allclose(weights[i, :n].numpy(), expect, rtol=1e-6, atol=1e-7)
    trained = batch_plain["labels"][:, 1:] != -100
    assert weights[:, 1:][trained].std() > 0.1  # weights really vary, so the check can fail
    g_plain, loss_plain = final_hidden_grads(plain, batch_plain)
    g_dft, loss_dft = final_hidden_grads(dft, batch_dft)
    # same denominator (kept tokens), so token t's gradient scales by exactly its weight
    torch.testing.assert_close(g_dft, g_plain * weights[:, 1:, None], atol=1e-9, rtol=1e-4)
    with torch.no_grad():  # and the loss is sum(w * nll) / kept, from an independent forward
        logits = dft.model(input_ids=batch_dft["input_ids"],
                           attention_mask=batch_dft["attention_mask"]).logits
        nll = per_token_nll(logits, batch_dft["input_ids"])
    expect_loss = (nll * weights[:, 1:] * trained).sum() / trained.sum()
    assert abs(loss_dft.item() - expect_loss.item()) < 1e-5
    assert abs(loss_dft.item() - loss_plain.item()) > 1e-3

    # Rho-1: a second model's output of the same tokens; keep the top 60% by excess loss.
    reference = score_demo(tmp_path / "ref", tiny_model_dir, limit=24, shard_size=8)
    ref = _stored(reference)
    rho1 = trainer_for(load(scored_output, select=Select("top", "excess_loss", fraction=0.6),
                            reference=reference), "rho1")
    ids, batch_rho1 = first_batch(rho1)
    differs_from_profit = 0
    for i, eid in enumerate(ids):
        r, n = stored[eid], len(stored[eid]["input_ids"])
        excess = (-r["logprobs"]) - (-ref[eid]["logprobs"])
        resp = np.flatnonzero(r["response_mask"])
        k = int(np.ceil(0.6 * len(resp)))
        top = resp[np.argsort(-excess[resp], kind="stable")[:k]]
        keep = np.zeros(n, dtype=bool)
        keep[top] = True
        expect = np.full(batch_rho1["labels"].shape[1], -100)
        expect[:n] = np.where(keep, r["input_ids"], -100)
        np.testing.assert_array_equal(batch_rho1["labels"][i].numpy(), expect)
        differs_from_profit += int((keep != r["loss_mask"].astype(bool)).sum())
    assert differs_from_profit > 0  # not the stored ProFit mask in disguise
    grad, _ = final_hidden_grads(rho1, batch_rho1)
    selected = batch_rho1["labels"][:, 1:] != -100
    per_position = grad.abs().sum(-1)
    assert (per_position[~selected] == 0).all() and (per_position[selected] > 0).all()

    for trainer in (dft, rho1):  # and real optimisation steps run on both
        result = trainer.train()
        assert trainer.state.global_step == 1 and np.isfinite(result.training_loss)
