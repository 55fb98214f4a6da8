"""Per-token signals (--signals): entropy, top-1 token and its logprob, gold rank, checked against
a direct full-softmax computation of the same model in float64."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.scorers.base import parse_signals
from tests.conftest import DEMO_GSM8K

SIGNAL_COLS = ("entropy", "top1_id", "top1_logprob", "rank")


@functools.cache
def plain_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def direct_signals(model_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Full-vocabulary log-softmax of one plain forward pass, in float64 numpy."""
    import torch

    model = plain_model(model_dir)
    with torch.inference_mode():
        logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0, :-1]
    z = logits.double().numpy()
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    gold = ids[1:]
    gold_logit = z[np.arange(len(gold)), gold]
    return {
        "gold": gold,
        "logprobs": logp[np.arange(len(gold)), gold],
        "entropy": -(np.exp(logp) * logp).sum(-1),
        "top1_id": z.argmax(-1),
        "top1_logprob": logp.max(-1),
        # rank by sorting: position of the gold token among logits sorted descending (ties: best)
        # by sorting: 1 + how many logits sort strictly above the gold one
        "rank": np.array([np.searchsorted(np.sort(-row), -g, side="left") + 1
                          for row, g in zip(z, gold_logit, strict=True)]),
    }


def check_against_direct(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert np.isnan(got["entropy"][0]) and np.isnan(got["top1_logprob"][0])
    assert got["top1_id"][0] == -1 and got["rank"][0] == -1
    assert got["entropy"].dtype == np.float32 and got["rank"].dtype == np.int32
    assert got["top1_id"].dtype == np.int32
    np.testing.assert_allclose(got["logprobs"][1:], want["logprobs"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["entropy"][1:], want["entropy"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["top1_logprob"][1:], want["top1_logprob"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["top1_id"][1:], want["top1_id"])
    np.testing.assert_array_equal(got["rank"][1:], want["rank"])
    # rank 1 exactly where the gold token is the argmax
    np.testing.assert_array_equal(got["rank"][1:] == 1, got["top1_id"][1:] == want["gold"])


def test_parse_signals() -> None:
    assert parse_signals(None) == ()
    assert parse_signals("rank,entropy, top1") == ("entropy", "top1", "rank")
    with pytest.raises(InputError, match="unknown signal 'perplexity'"):
        parse_signals("entropy,perplexity")


def test_tiny_model_signals_equal_full_softmax(tiny_model_dir: Path) -> None:
    from profit_prep.scorers.base import TransformersScorer

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 49152, n).astype(np.int32) for n in (37, 5, 64)]
    # a small logits budget forces several LM-head chunks per row
    scorer = TransformersScorer(tiny_model_dir, signals="entropy,top1,rank", logits_budget_mb=4)
    assert scorer.chunk < 37
    got = scorer.score_with_signals(seqs)
    plain = TransformersScorer(tiny_model_dir).score(seqs)
    for seq, g, lp in zip(seqs, got, plain, strict=True):
        assert set(g) == {"logprobs", *SIGNAL_COLS}
        assert all(len(v) == len(seq) for v in g.values())
        np.testing.assert_array_equal(g["logprobs"], lp)  # score() unchanged by signals
        check_against_direct(g, direct_signals(tiny_model_dir, seq))


def test_pipeline_stores_signal_columns(tmp_path: Path, tiny_model_dir: Path) -> None:
    from profit_prep import ScoreConfig, score
    from profit_prep.scorers.base import TransformersScorer
    from profit_prep.store.reader import read_manifest

    out = tmp_path / "out"
    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(tiny_model_dir),
                      prompt_field="question", response_field="answer", limit=5, shard_size=3,
                      quiet=True, signals="top1,entropy,rank"))
    manifest = read_manifest(out)
    assert all(c in manifest["columns"] for c in SIGNAL_COLS)
    assert json.loads((out / "run.json").read_text())["signals"] == ["entropy", "top1", "rank"]
    table = pq.read_table(out / "data")
    rows = table.to_pylist()
    assert len(rows) == 5
    scorer = TransformersScorer(tiny_model_dir, signals="entropy,top1,rank")
    direct = scorer.score_with_signals([np.array(r["input_ids"], np.int32) for r in rows])
    for r, d in zip(rows, direct, strict=True):
        for c in SIGNAL_COLS:
            stored = np.array(r[c], dtype=d[c].dtype)
            np.testing.assert_allclose(stored, d[c], atol=1e-5, rtol=0)
    assert table.schema.field("rank").type.value_type == pa.int32()

    plain = tmp_path / "plain"
    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(plain), model=str(tiny_model_dir),
                      prompt_field="question", response_field="answer", limit=2, quiet=True))
    assert not any(c in read_manifest(plain)["columns"] for c in SIGNAL_COLS)
    assert "signals" not in json.loads((plain / "run.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"signals": "entropy,nope"}, "unknown signal 'nope'"),
     ({"backend": "vllm", "signals_top_k": 0}, "--signals-top-k must be at least 1")],
)
def test_bad_signal_options_are_refused(tmp_path: Path, extra: dict, message: str) -> None:
    from profit_prep import ScoreConfig
    from profit_prep.job import prepare

    config = ScoreConfig(data=str(DEMO_GSM8K), out=str(tmp_path / "o"), prompt_field="question",
                         response_field="answer", **{"signals": "entropy", **extra})
    with pytest.raises(InputError, match=message):
        prepare(config)


@pytest.mark.slow
def test_smollm2_signals_equal_full_softmax(smollm2_dir: Path, smollm2_tokenizer) -> None:
    from profit_prep.scorers.base import TransformersScorer

    rows = [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()[:3]]
    seqs = [np.array(smollm2_tokenizer(r["question"] + "\n" + r["answer"])["input_ids"], np.int32)
            for r in rows]
    got = TransformersScorer(smollm2_dir, signals="entropy,top1,rank").score_with_signals(seqs)
    for seq, g in zip(seqs, got, strict=True):
        check_against_direct(g, direct_signals(smollm2_dir, seq))


# --------------------------------------------------------------------------- top-k backends


def vllm_style_entries(logp: np.ndarray, gold: np.ndarray, k: int) -> list:
    """What vLLM returns per position (vllm/v1/sample/sampler.py, vllm/logprobs.py): the actual
    token with rank = #{logprob >= its own}, then the top k with ranks 1..k, which overwrite the
    actual token's entry when it is among them. Ties are put highest id first, the opposite of
    argmax, so the code under test cannot lean on vLLM's tie order."""
    entries: list = [None]
    for row, g in zip(logp, gold, strict=True):
        order = sorted(range(len(row)), key=lambda v: (-row[v], -v))[:k]
        entry = {int(g): (float(row[g]), int((row >= row[g]).sum()))}
        entry.update({v: (float(row[v]), r) for r, v in enumerate(order, 1)})
        entries.append(entry)
    return entries


def lower_bound_entropy(top: np.ndarray) -> np.ndarray:
    """The top-k estimator written out once more, for rows sorted descending."""
    p = np.exp(top)
    tail = np.maximum(1 - p.sum(-1), 0)
    bound = np.maximum(np.minimum(tail, p[:, -1]), 1e-300)
    return -(p * top).sum(-1) + np.where(tail > 0, -tail * np.log(bound), 0)


def test_top_k_signals_equal_full_distribution_figures() -> None:
    from profit_prep.scorers.top_k import top_k_signals

    rng = np.random.default_rng(1)
    vocab, n, k = 40, 60, 5
    z = rng.normal(0, 3, (n - 1, vocab))
    z[3, 7] = z[3, 11] = z[3].max() + 1  # top-1 tie: argmax takes the lowest id (7)
    z[5, 9] = z[5, 2] = z[5].max() + 1  # top-1 tie again, with the higher id listed first
    gold = rng.integers(0, vocab, n - 1)
    gold[0], gold[1] = np.argsort(-z[0])[0], np.argsort(-z[1])[30]  # the top-1, far outside
    gold[5] = 9  # the actual token shares the best logit: rank 1
    order = np.argsort(-z[7])
    # tied with the k-th, lower id: listed after it, outside the top k (rank counted k + 1)
    gold[7] = min(order[k - 1], order[k + 3])
    z[7, gold[7]] = z[7, max(order[k - 1], order[k + 3])] = z[7, order[k - 1]]
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    ids = np.concatenate([[0], gold])
    got = top_k_signals(ids, vllm_style_entries(logp, gold, k), k, ("entropy", "top1", "rank"))
    exact_h = -(np.exp(logp) * logp).sum(-1)
    assert set(got) == {"logprobs", *SIGNAL_COLS} and all(len(v) == n for v in got.values())
    assert np.isnan(got["entropy"][0]) and got["top1_id"][0] == -1 and got["rank"][0] == -1
    np.testing.assert_allclose(got["logprobs"][1:], logp[np.arange(n - 1), gold], atol=1e-6)
    np.testing.assert_array_equal(got["top1_id"][1:], z.argmax(-1))
    np.testing.assert_allclose(got["top1_logprob"][1:], logp.max(-1), atol=1e-6)
    gold_z = z[np.arange(n - 1), gold]
    np.testing.assert_array_equal(got["rank"][1:], 1 + (z > gold_z[:, None]).sum(-1))
    assert got["rank"][1] == 1 and got["rank"][2] == 31 and got["rank"][6] == 1
    assert got["rank"][8] == k
    assert got["top1_id"][4] == 7 and got["top1_id"][6] == 2
    top = -np.sort(-logp, axis=-1)[:, :k]
    np.testing.assert_allclose(got["entropy"][1:], lower_bound_entropy(top), atol=1e-5)
    assert (got["entropy"][1:] <= exact_h + 1e-5).all()  # a lower bound
    # With k = vocab the "estimate" is the exact entropy.
    full = top_k_signals(ids, vllm_style_entries(logp, gold, vocab), vocab, ("entropy",))
    np.testing.assert_allclose(full["entropy"][1:], exact_h, atol=1e-5)


def test_top_k_signals_edges_and_malformed_answers() -> None:
    from profit_prep.scorers.top_k import top_k_signals

    assert {k: v.shape for k, v in top_k_signals([], [], 3, ("rank",)).items()} == {
        "logprobs": (0,), "rank": (0,)}
    one = top_k_signals([4], [None], 3, ("entropy",))
    assert np.isnan(one["entropy"]).all() and one["entropy"].shape == (1,)
    with pytest.raises(RuntimeError, match="lack the actual token 8 at position 1"):
        top_k_signals([1, 8], [None, {3: (-0.1, 1)}], 1, ("rank",))
    with pytest.raises(RuntimeError, match="2 prompt logprobs for 3 tokens"):
        top_k_signals([1, 8, 9], [None, {8: (-0.1, 1)}], 1, ("rank",))
