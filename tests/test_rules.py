"""Load-time selection rules (profit_prep.rules.selection via load(select=...)): every rule's mask
equals a
direct per-row NumPy computation from the stored Parquet columns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from profit_prep.errors import InputError
from profit_prep.rules.selection import Select
from profit_prep.store.reader import read_manifest
from profit_prep.training.loader import load
from tests.conftest import score_demo

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


@pytest.fixture(scope="module")
def signals_out(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """8 GSM8K rows scored by the tiny Llama with every signal, in 3 shards."""
    return score_demo(tmp_path_factory.mktemp("sig") / "out", tiny_model_dir,
                      signals="entropy,top1,rank")


@pytest.fixture(scope="module")
def smollm2_out(tmp_path_factory, smollm2_dir: Path) -> Path:
    """The same 8 rows scored by the real SmolLM2 (the reference model of excess-loss rules)."""
    return score_demo(tmp_path_factory.mktemp("ref") / "out", smollm2_dir, signals="entropy")


def rows_of(out: Path) -> dict[str, dict[str, np.ndarray]]:
    rows = {}
    for shard in read_manifest(out)["shards"]:
        for r in pq.read_table(out / shard["file"]).to_pylist():
            rows[r["example_id"]] = {k: np.array(v, dtype=float if k in (
                "logprobs", "entropy", "top1_logprob") else None) for k, v in r.items()
                if isinstance(v, list)}
    return rows


def loaded_masks(ds) -> dict[str, np.ndarray]:
    return {e: np.array(m, bool) for e, m in zip(ds["example_id"], ds["completion_mask"],
                                                  strict=True)}


def top_per_row(score: np.ndarray, resp: np.ndarray, fraction: float) -> np.ndarray:
    """Independent reference: stable argsort of one row's response tokens, largest first."""
    idx = np.flatnonzero(resp)
    k = math.ceil(round(fraction * len(idx), 9))
    order = idx[np.argsort(-score[idx], kind="stable")]
    keep = np.zeros(len(score), bool)
    keep[order[:k]] = True
    return keep


def top_global(scores: dict[str, np.ndarray], resps: dict[str, np.ndarray], fraction: float):
    every = np.sort(np.concatenate([scores[e][resps[e]] for e in scores]))[::-1]
    k = math.ceil(round(fraction * len(every), 9))
    threshold = every[k - 1]
    return {e: resps[e] & (scores[e] >= threshold) for e in scores}


def test_top_fraction_per_example_and_global(signals_out: Path) -> None:
    rows = rows_of(signals_out)
    resp = {e: r["response_mask"].astype(bool) for e, r in rows.items()}
    prob = {e: np.exp(r["logprobs"]) for e, r in rows.items()}
    ds = load(signals_out, select=Select("top", "prob", fraction=0.3))
    for e, got in loaded_masks(ds).items():
        want = top_per_row(prob[e], resp[e], 0.3)
        np.testing.assert_array_equal(got, want)
        assert got.sum() == math.ceil(0.3 * resp[e].sum())
    ds = load(signals_out, select=Select("top", "prob", fraction=0.3, scope="global"))
    want = top_global(prob, resp, 0.3)
    got = loaded_masks(ds)
    for e in rows:
        np.testing.assert_array_equal(got[e], want[e])
    n_resp = sum(r.sum() for r in resp.values())
    assert sum(m.sum() for m in got.values()) == math.ceil(0.3 * n_resp)  # no ties in floats


@pytest.mark.slow
def test_entropy_rules(signals_out: Path, smollm2_out: Path) -> None:
    for out in (signals_out, smollm2_out):
        rows = rows_of(out)
        resp = {e: r["response_mask"].astype(bool) for e, r in rows.items()}
        ent = {e: r["entropy"] for e, r in rows.items()}
        every = np.concatenate([ent[e][resp[e]] for e in rows])
        lo, hi = np.quantile(every, [0.25, 0.75])
        got = loaded_masks(load(out, select=Select("band", "entropy", lo=lo, hi=hi), labels=True))
        for e in rows:
            np.testing.assert_array_equal(got[e], resp[e] & (ent[e] >= lo) & (ent[e] <= hi))
        # "forking tokens": the 20% highest-entropy response tokens of the whole dataset
        got = loaded_masks(load(out, select=Select("top", "entropy", fraction=0.2,
                                                   scope="global")))
        want = top_global(ent, resp, 0.2)
        for e in rows:
            np.testing.assert_array_equal(got[e], want[e])


@pytest.mark.slow
def test_rho1_and_token_cleaning_excess_loss(signals_out: Path, smollm2_out: Path) -> None:
    model, ref = rows_of(signals_out), rows_of(smollm2_out)
    resp = {e: r["response_mask"].astype(bool) for e, r in model.items()}
    excess = {e: (-model[e]["logprobs"]) - (-ref[e]["logprobs"]) for e in model}
    rho1 = load(signals_out, select=Select("top", "excess_loss", fraction=0.6),
                reference=smollm2_out)
    for e, got in loaded_masks(rho1).items():
        np.testing.assert_array_equal(got, top_per_row(excess[e], resp[e], 0.6))
    for e, x in zip(rho1["example_id"], rho1["excess_loss"], strict=True):
        np.testing.assert_allclose(np.array(x, float)[1:], excess[e][1:], atol=1e-6)
    clean = load(signals_out, select=Select("top", "excess_loss", fraction=0.6, scope="global"),
                 reference=smollm2_out)
    want = top_global(excess, resp, 0.6)
    for e, got in loaded_masks(clean).items():
        np.testing.assert_array_equal(got, want[e])


def test_rank_band_and_refusals(signals_out: Path, tiny_out_plain: Path) -> None:
    rows = rows_of(signals_out)
    got = loaded_masks(load(signals_out, select=Select("band", "rank", hi=100)))
    for e, r in rows.items():
        np.testing.assert_array_equal(got[e], r["response_mask"].astype(bool) & (r["rank"] <= 100))
    with pytest.raises(InputError, match="score it with --signals entropy"):
        load(tiny_out_plain, select=Select("band", "entropy", lo=1.0))
    with pytest.raises(InputError, match="needs reference"):
        load(signals_out, select=Select("top", "excess_loss", fraction=0.5))
    with pytest.raises(InputError, match="not both"):
        load(signals_out, tau=0.2, select=Select("top", "prob", fraction=0.5))
    with pytest.raises(InputError, match="fraction"):
        Select("top", "prob", fraction=1.5)


@pytest.fixture(scope="module")
def tiny_out_plain(tmp_path_factory, tiny_model_dir: Path) -> Path:
    return score_demo(tmp_path_factory.mktemp("plain") / "out", tiny_model_dir, limit=3)
