"""The transformers scorer against an independent oracle: one plain forward + log_softmax."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from profit_prep.scorers.transformers_model import TransformersScorer, length_batches


def oracle_logprobs(model_dir: Path, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """What a user would write: full logits, log_softmax, gather the next token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor(seq, dtype=torch.long)[None]
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            gold = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
            out.append(np.concatenate([[np.nan], gold]).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 49152, size=n).astype(np.int32) for n in (5, 64, 17, 130, 2, 33)]


def test_matches_oracle_per_row_and_batched(tiny_model_dir: Path, sequences) -> None:
    expected = oracle_logprobs(tiny_model_dir, sequences)
    for budget in (1, 512, 100_000):  # one row per call, small batches, everything at once
        scorer = TransformersScorer(tiny_model_dir, max_batch_tokens=budget)
        got = scorer.score(sequences)
        for g, e in zip(got, expected):
            assert g.dtype == np.float32 and len(g) == len(e)
            assert np.isnan(g[0])
            np.testing.assert_allclose(g[1:], e[1:], atol=1e-5, rtol=0)


def test_chunked_lm_head_equals_unchunked(tiny_model_dir: Path, sequences) -> None:
    whole = TransformersScorer(tiny_model_dir).score(sequences)
    chunked = TransformersScorer(tiny_model_dir, logits_budget_mb=1)  # 16-position chunks
    assert chunked.chunk < 130
    for a, b in zip(whole, chunked.score(sequences)):
        np.testing.assert_allclose(a[1:], b[1:], atol=1e-6, rtol=0)


def test_length_batches_cover_every_row_within_budget() -> None:
    lengths = [5, 300, 17, 17, 200, 1, 64, 64, 64]
    batches = length_batches(lengths, 400)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 400


def test_long_row_scores_without_a_kv_cache(tiny_model_dir: Path, sequences) -> None:
    """Scoring never reads past keys/values: building the cache cost ~370 MB on an 8k row.

    The decoder's own output says whether it built one; the long row still matches the oracle.
    """
    long_row = np.random.default_rng(1).integers(0, 49152, size=3000).astype(np.int32)
    rows = [*sequences, long_row]
    [expected] = oracle_logprobs(tiny_model_dir, [long_row])
    for budget in (1, 100_000):  # one row per forward, and padded batches (masked attention)
        scorer = TransformersScorer(tiny_model_dir, max_batch_tokens=budget)
        outputs: list = []
        scorer.decoder.register_forward_hook(lambda _m, _a, out, seen=outputs: seen.append(out))
        got = scorer.score(rows)
        assert outputs and all(out.past_key_values is None for out in outputs)
        np.testing.assert_allclose(got[-1][1:], expected[1:], atol=1e-5, rtol=0)


def test_null_backend_is_instant_and_shaped_like_the_others(tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    """--backend null (benchmarks of the pipeline's own cost): every logprob 0, so p = 1 and the
    mask keeps every response token; signal columns in the transformers backend's shapes."""
    import pyarrow.parquet as pq

    from profit_prep.scorers.base import NullScorer
    from tests.conftest import score_demo

    seqs = [np.array([1, 5, 9, 2]), np.array([7])]
    null = NullScorer(signals="entropy,top1,rank").score_with_signals(seqs)
    real = TransformersScorer(tiny_model_dir, signals="entropy,top1,rank").score_with_signals(seqs)
    for a, b in zip(null, real, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert null[0]["top1_id"].tolist() == [-1, 5, 9, 2]
    assert null[0]["rank"].tolist() == [-1, 1, 1, 1]
    out = score_demo(tmp_path / "o", tiny_model_dir, limit=6, backend="null")
    table = pq.read_table(out / "data")
    assert table["loss_mask"].to_pylist() == table["response_mask"].to_pylist()
