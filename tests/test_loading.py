"""The loader: re-thresholding, labels/weights, truncation, tokenizer and damage checks, and real
TRL SFTTrainer steps proving masked tokens carry no gradient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.store.reader import read_manifest
from profit_prep.training.loader import load
from tests.conftest import final_hidden_grads, score_demo

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """8 GSM8K rows scored by the tiny random Llama (tau = 0.1), in 3 shards."""
    return score_demo(tmp_path_factory.mktemp("tiny") / "out", tiny_model_dir)


def parquet_rows(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every scored row, straight from the shards, keyed by example id."""
    rows = {}
    for shard in read_manifest(out)["shards"]:
        for r in pq.read_table(out / shard["file"]).to_pylist():
            rows[r["example_id"]] = {
                k: np.array(r[k]) for k in ("input_ids", "response_mask", "logprobs", "loss_mask")
            }
    return rows


def loaded(ds, column: str) -> dict[str, np.ndarray]:
    return {e: np.array(v) for e, v in zip(ds["example_id"], ds[column], strict=True)}


# -- (b) re-thresholding equals a fresh scoring run ------------------------------------------------


def test_default_is_stored_mask(tiny_out: Path) -> None:
    rows = parquet_rows(tiny_out)
    ds = load(tiny_out)
    assert ds.column_names == ["example_id", "input_ids", "completion_mask"]
    assert len(ds) == len(rows) == 8
    for eid, mask in loaded(ds, "completion_mask").items():
        np.testing.assert_array_equal(mask.astype(bool), rows[eid]["loss_mask"])
    for eid, ids in loaded(ds, "input_ids").items():
        np.testing.assert_array_equal(ids, rows[eid]["input_ids"])


@pytest.mark.parametrize("kind", ["tau0.3", "median", "lower", "random"])
def test_rethreshold_matches_fresh_scoring(
    kind: str, tiny_out: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = parquet_rows(tiny_out)
    # The random tiny model puts p ~ 1/vocab everywhere, so tau=0.3 keeps nothing; the median of
    # its own response-token probabilities splits the tokens and makes the comparison bite.
    p = np.exp(np.concatenate([r["logprobs"][r["response_mask"]] for r in rows.values()]))
    median = float(np.median(p))
    rule = {
        "tau0.3": {"tau": 0.3},
        "median": {"tau": median},
        "lower": {"strategy": "lower", "tau": median},
        "random": {"strategy": "random", "keep_fraction": 0.4, "seed": 7},
    }[kind]
    fresh = parquet_rows(score_demo(tmp_path / "fresh", tiny_model_dir, **rule))
    got = loaded(load(tiny_out, **rule), "completion_mask")
    assert got.keys() == fresh.keys()
    kept = 0
    for eid, mask in got.items():
        np.testing.assert_array_equal(fresh[eid]["logprobs"], rows[eid]["logprobs"])
        np.testing.assert_array_equal(mask.astype(bool), fresh[eid]["loss_mask"])
        kept += int(mask.sum())
    n_response = int(sum(r["response_mask"].sum() for r in rows.values()))
    if kind != "tau0.3":
        assert 0 < kept < n_response  # the rule really split the tokens


def test_rethreshold_middle_and_bad_rule(tiny_out: Path) -> None:
    rows = parquet_rows(tiny_out)
    p_all = np.exp(np.concatenate([r["logprobs"][r["response_mask"]] for r in rows.values()]))
    lo, hi = (float(q) for q in np.quantile(p_all, [0.25, 0.75]))
    got = loaded(load(tiny_out, strategy="middle", tau_low=lo, tau_high=hi), "completion_mask")
    for eid, mask in got.items():
        with np.errstate(invalid="ignore"):
            p = np.exp(rows[eid]["logprobs"])
            expect = rows[eid]["response_mask"] & (p >= lo) & (p <= hi)
        np.testing.assert_array_equal(mask.astype(bool), expect)
    with pytest.raises(InputError, match="tau-low"):
        load(tiny_out, strategy="middle")
    with pytest.raises(InputError, match="tau must be"):
        load(tiny_out, tau=1.5)


# -- (d) labels, weights, truncation -------------------------------------------------------------


def test_labels_weights_response_vs_numpy(tiny_out: Path) -> None:
    rows = parquet_rows(tiny_out)
    tau = float(np.median(np.exp(np.concatenate(
        [r["logprobs"][r["response_mask"]] for r in rows.values()]))))
    ds = load(tiny_out, tau=tau, labels=True, weights="prob", response_mask=True)
    assert {"labels", "weights", "response_mask"} <= set(ds.column_names)
    eot = read_manifest(tiny_out)["render"]["end_of_turn_ids"]
    assert eot == [2]  # SmolLM2's <|im_end|>
    for eid, row in ds.to_pandas().set_index("example_id").iterrows():
        r = rows[eid]
        with np.errstate(invalid="ignore"):
            keep = r["response_mask"] & ((np.exp(r["logprobs"]) >= tau) | (r["input_ids"] == 2))
        np.testing.assert_array_equal(row["labels"], np.where(keep, r["input_ids"], -100))
        np.testing.assert_array_equal(row["response_mask"].astype(bool), r["response_mask"])
        expect_w = np.zeros(len(r["logprobs"]), np.float32)
        expect_w[r["response_mask"]] = np.exp(r["logprobs"][r["response_mask"]])
        np.testing.assert_allclose(row["weights"], expect_w, rtol=1e-6)
        assert np.isfinite(row["weights"]).all()
    with pytest.raises(InputError, match="unknown weights"):
        load(tiny_out, weights="entropy")


def test_max_length_truncates_all_columns_together(tiny_out: Path) -> None:
    rows = parquet_rows(tiny_out)
    n = int(np.median([len(r["input_ids"]) for r in rows.values()]))
    ds = load(tiny_out, max_length=n, labels=True, weights="prob", response_mask=True)
    long_rows = 0
    for row in ds:
        r = rows[row["example_id"]]
        m = min(n, len(r["input_ids"]))
        long_rows += len(r["input_ids"]) > n
        for col in ("input_ids", "completion_mask", "labels", "weights", "response_mask"):
            assert len(row[col]) == m, col
        np.testing.assert_array_equal(row["input_ids"], r["input_ids"][:m])
        np.testing.assert_array_equal(np.array(row["completion_mask"], bool), r["loss_mask"][:m])
        np.testing.assert_array_equal(
            row["labels"], np.where(r["loss_mask"][:m], r["input_ids"][:m], -100))
    assert long_rows > 0


def test_dataset_is_memory_mapped_arrow(tiny_out: Path) -> None:
    ds = load(tiny_out, tau=0.2)
    assert ds.cache_files and ds.cache_files[0]["filename"].endswith(".arrow")
    again = load(tiny_out, tau=0.2)  # same shards + arguments: the cached file is reused
    assert again.cache_files[0]["filename"] == ds.cache_files[0]["filename"]
    assert load(tiny_out, tau=0.3).cache_files[0]["filename"] != ds.cache_files[0]["filename"]


# -- (c) tokenizer check -------------------------------------------------------------------------


def test_tokenizer_check(tiny_out: Path, tiny_model_dir: Path, smollm2_tokenizer) -> None:
    import copy

    assert len(load(tiny_out, tokenizer=tiny_model_dir)) == 8  # the same tokenizer, by folder
    assert len(load(tiny_out, tokenizer=smollm2_tokenizer)) == 8  # ... and as an object

    extra = copy.deepcopy(smollm2_tokenizer)
    extra.add_special_tokens({"additional_special_tokens": ["<|profit_test|>"]})
    with pytest.raises(InputError, match="special tokens") as err:
        load(tiny_out, tokenizer=extra)
    assert "chat template" not in str(err.value)

    templated = copy.deepcopy(smollm2_tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="chat template") as err:
        load(tiny_out, tokenizer=templated)
    assert "vocab" not in str(err.value) and "special tokens" not in str(err.value)

    with pytest.warns(UserWarning, match="chat template"):
        assert len(load(tiny_out, tokenizer=templated, allow_tokenizer_mismatch=True)) == 8


# -- (e) damaged or unfinished output ------------------------------------------------------------


def test_damaged_output_refused(tiny_out: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_out, broken)
    shard = broken / read_manifest(broken)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="part-00001.parquet: checksum differs"):
        load(broken)

    shard.unlink()
    with pytest.raises(InputError, match="part-00001.parquet: missing"):
        load(broken)

    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").unlink()
    with pytest.raises(InputError, match="not finished"):
        load(broken)

    # a shard replaced by another valid Parquet file with the wrong row count
    shutil.rmtree(broken)
    shutil.copytree(tiny_out, broken)
    manifest["shards"][0]["rows"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    # (the manifest's own totals no longer add up either: refused before any shard is read)
    with pytest.raises(InputError, match="rows, manifest says|shard list holds 9 rows"):
        load(broken)
    with pytest.raises(InputError, match="not a profit-prep output"):
        load(tmp_path / "nowhere")


# -- (a) real TRL SFTTrainer steps ---------------------------------------------------------------


MAX_LENGTH = 160


@pytest.mark.slow
def test_trl_sft_trainer_masked_tokens_get_no_gradient(
    scored_output: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = parquet_rows(scored_output)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def trainer_for(dataset, out: str) -> SFTTrainer:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = SFTConfig(
            output_dir=str(tmp_path / out), max_steps=2, per_device_train_batch_size=4,
            completion_only_loss=True, max_length=MAX_LENGTH, bf16=False,
            gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
            logging_steps=1, learning_rate=1e-2, seed=0, shuffle_dataset=False,
        )
        return SFTTrainer(model=model, args=args, train_dataset=dataset,
                          processing_class=tokenizer)

    def collate(trainer: SFTTrainer, ids: list[str]) -> dict:
        by_id = {e: i for i, e in enumerate(trainer.train_dataset["example_id"])}
        return trainer.data_collator([trainer.train_dataset[by_id[e]] for e in ids])

    def grads(trainer: SFTTrainer, batch: dict):
        hidden, loss = final_hidden_grads(trainer, batch)  # zero exactly where t is not trained
        params = torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                            if p.grad is not None])
        return hidden.abs().sum(-1), loss, params.clone()

    trainer = trainer_for(load(scored_output, max_length=MAX_LENGTH), "profit")
    ids = list(trainer.train_dataset["example_id"][:4])
    batch = collate(trainer, ids)
    grad, loss, params = grads(trainer, batch)

    # the collated labels: input_ids where the stored loss mask keeps the token, else -100
    masked_response = 0
    for i, eid in enumerate(ids):
        r = rows[eid]
        n = min(len(r["input_ids"]), MAX_LENGTH)
        keep = r["loss_mask"][:n]
        expect = np.full(batch["labels"].shape[1], -100)
        expect[:n] = np.where(keep, r["input_ids"][:n], -100)
        np.testing.assert_array_equal(batch["labels"][i].numpy(), expect)
        masked_response += int((r["response_mask"][:n] & ~keep).sum())
    assert masked_response > 0  # ProFit really masked some response tokens here

    trained = batch["labels"][:, 1:] != -100
    assert (grad[~trained] == 0).all()
    assert (grad[trained] > 0).all()

    # Changing a kept token's target changes loss and gradients ...
    changed = dict(batch)
    changed["labels"] = batch["labels"].clone()
    i, t = (batch["labels"] != -100).nonzero()[0].tolist()
    changed["labels"][i, t] = (changed["labels"][i, t] + 1) % tokenizer.vocab_size
    _, loss_same, params_same = grads(trainer, batch)  # deterministic: differences are real
    assert loss_same.item() == loss.item() and torch.equal(params_same, params)
    _, loss2, params2 = grads(trainer, changed)
    assert loss2.item() != loss.item()
    assert not torch.allclose(params2, params)

    # ... and the detector can fail: keeping every response token gives the masked ones gradient.
    everything = trainer_for(load(scored_output, max_length=MAX_LENGTH, tau=0.0), "all")
    batch_all = collate(everything, ids)
    grad_all, _, params_all = grads(everything, batch_all)
    np.testing.assert_array_equal(batch_all["input_ids"].numpy(), batch["input_ids"].numpy())
    newly = (batch_all["labels"][:, 1:] != -100) & ~trained
    assert newly.sum() > 0 and (grad_all[newly] > 0).all()
    assert not torch.allclose(params_all, params)

    # Real optimisation steps run and move the weights.
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                      strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("train_trl.py", ["--normalize", "response"]),
    ("train_hf_trainer.py", ["--tau", "0.3"]),
    ("train_torch.py", ["--packed", "--weights", "prob"]),
])
def test_examples_run(
    script: str, extra: list[str], scored_output: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "pipelines" / "examples" / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = ["--out", str(tmp_path)] if script != "train_torch.py" else []
    result = module.main(["--data", str(scored_output), "--model", str(tiny_model_dir),
                          "--steps", "1", "--max-length", "128", *out, *extra])
    assert result["steps"] == 1 and np.isfinite(result["loss"]) and result["loss"] > 0


@pytest.mark.slow
def test_readme_training_snippet_runs_as_written(tmp_path: Path, smollm2_dir: Path) -> None:
    """The README's TRL snippet, copied from README.md at test time, after a (short) demo."""
    import re
    import subprocess
    import sys

    from tests.conftest import REPO, score_demo

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Training with the masks"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "SFTTrainer(" in snippet and "demo-out" in snippet
    score_demo(tmp_path / "demo-out", smollm2_dir, limit=8)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_loss" in result.stdout + result.stderr


def test_protected_end_of_turn_gets_gradient_and_unprotected_does_not(
    tiny_out: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A real SFTTrainer batch: <|im_end|> closing each answer is trained under the default mask,
    and not under protect="none" (the random tiny model finds it unlikely, as SmolLM2 does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def gradient_at_end_of_turn(dataset) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        args = SFTConfig(output_dir=str(tmp_path / "t"), max_steps=1, completion_only_loss=True,
                         max_length=1024, bf16=False, gradient_checkpointing=False,
                         use_cpu=True, report_to=[], save_strategy="no")
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        hidden, _ = final_hidden_grads(trainer, batch)  # position t-1 predicts token t
        ids = batch["input_ids"][:, 1:]
        response = torch.tensor(np.stack([np.pad(np.array(m[1:]), (0, ids.shape[1] - len(m) + 1))
                                          for m in dataset["response_mask"][:4]])).bool()
        end = (ids == 2) & response  # <|im_end|> closing an answer
        return hidden.abs().sum(-1)[end], end

    # A threshold just above every answer's end-of-turn probability, so that the paper's rule
    # masks them all while other tokens stay (TRL drops rows with nothing left to train).
    rows = parquet_rows(tiny_out)
    p_end = [np.exp(r["logprobs"][r["response_mask"] & (r["input_ids"] == 2)]) for r in
             rows.values()]
    tau = float(np.max(np.concatenate(p_end))) * 1.0001
    protected, end = gradient_at_end_of_turn(load(tiny_out, response_mask=True, tau=tau))
    unprotected, end2 = gradient_at_end_of_turn(load(tiny_out, response_mask=True, tau=tau,
                                                     protect="none"))
    assert torch.equal(end, end2) and end.sum() == 4  # one answer per row
    assert (protected > 0).all()
    assert (unprotected == 0).all()


# -- the tokenizer check covers what decides ids, not only the vocabulary (issue 22) -------------


@pytest.mark.parametrize(
    ("change", "part"),
    [("normalizer", "normalizer/pre-tokenizer/merges"),
     ("pre_tokenizer", "normalizer/pre-tokenizer/merges"),
     ("merges", "normalizer/pre-tokenizer/merges"),
     ("post_processor", "normalizer/pre-tokenizer/merges"),
     ("clean_up", "settings")],
)
def test_load_refuses_a_tokenizer_changed_beyond_its_vocab(
    tiny_out: Path, tiny_model_dir: Path, tmp_path: Path, change: str, part: str
) -> None:
    from profit_prep.rendering.renderer import load_tokenizer
    from tests.test_pipeline import changed_tokenizer

    changed = changed_tokenizer(tiny_model_dir, tmp_path / "changed", change)
    tokenizer = load_tokenizer(changed)
    assert tokenizer.get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()
    with pytest.raises(InputError, match="the tokenizer differs") as caught:
        load(tiny_out, tokenizer=changed)
    assert part in str(caught.value) and "vocab," not in str(caught.value)
    with pytest.raises(InputError, match=part):
        load(tiny_out, tokenizer=tokenizer)  # as an object too


def test_an_output_with_an_older_fingerprint_is_not_silently_accepted(
    tiny_out: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    old = Path(shutil.copytree(tiny_out, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    for part in ("backend", "settings"):  # what earlier versions did not store
        del manifest["tokenizer"][part]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert len(load(old)) == 8  # no tokenizer given: readable as before
    with pytest.raises(InputError, match="written by an earlier profit-prep") as caught:
        load(old, tokenizer=tiny_model_dir)
    assert "allow_tokenizer_mismatch=True" in str(caught.value)
    with pytest.warns(UserWarning, match="earlier profit-prep"):
        assert len(load(old, tokenizer=tiny_model_dir, allow_tokenizer_mismatch=True)) == 8
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    extra = load_tokenizer_with_extra_special(other)
    with pytest.raises(InputError, match="special tokens differ"):  # what it can compare, it does
        load(old, tokenizer=extra)


def load_tokenizer_with_extra_special(folder: Path):
    from profit_prep.rendering.renderer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|profit_old|>"]})
    return tokenizer
