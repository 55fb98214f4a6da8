"""The vLLM backend: prompt-logprob parsing, and agreement with the transformers backend."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from profit_prep.config import ScoreConfig
from profit_prep.errors import InputError
from profit_prep.rules.profit import MaskRule, loss_mask
from profit_prep.scorers.choose import make_scorer
from profit_prep.scorers.top_k import gold_logprobs
from profit_prep.scorers.vllm_engine import cpu_env_defaults, vllm_entries

ROWS = 8
TOP_K = 20  # the engine's signals_top_k (the default)
SIGNALS = "entropy,top1,rank"
# benchmarks/signals_error.py on 20 demo rows (these 8 among them), k = 20: max 1.289, mean 0.070.
MAX_ERROR_BOUND, MEAN_ERROR_BOUND = 1.35, 0.12


def vllm_logprob_types():
    """Real vLLM Logprob/FlatLogprobs classes, or a skip that says why."""
    try:
        from vllm.logprobs import FlatLogprobs, Logprob
    except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM here"
        pytest.skip(f"vllm does not import: {type(exc).__name__}: {exc}")
    return Logprob, FlatLogprobs


# --------------------------------------------------------------------------- parsing


def actual_token_logprobs(token_ids, prompt_logprobs) -> tuple[np.ndarray, np.ndarray]:
    """What the vLLM scorer makes of one answer: the actual token's logprob and rank at every
    position (NaN and -1 at 0)."""
    return gold_logprobs(vllm_entries(prompt_logprobs), token_ids)


def test_actual_token_outside_top_k_is_read_by_id() -> None:
    Logprob, _ = vllm_logprob_types()
    ids = [1, 7, 9]
    entries = [
        None,
        # top-1 is token 3; the actual token 7 sits at rank 40 (as vLLM adds it, first).
        {7: Logprob(-6.5, rank=40), 3: Logprob(-0.2, rank=1)},
        {9: Logprob(-0.1, rank=1)},  # actual token is also the top-1: one entry
    ]
    lp, rank = actual_token_logprobs(ids, entries)
    assert np.isnan(lp[0]) and rank[0] == -1
    assert lp[1] == np.float32(-6.5) and rank[1] == 40
    assert lp[2] == np.float32(-0.1) and rank[2] == 1
    assert lp.dtype == np.float32


def test_ties_take_the_actual_tokens_entry() -> None:
    Logprob, _ = vllm_logprob_types()
    # Two tokens share the best logprob; the actual one (5) must be chosen, not "the first".
    entries = [None, {4: Logprob(-0.693, rank=1), 5: Logprob(-0.693, rank=2)}]
    lp, rank = actual_token_logprobs([0, 5], entries)
    assert lp[1] == np.float32(-0.693) and rank[1] == 2


def test_flat_logprobs_container() -> None:
    Logprob, FlatLogprobs = vllm_logprob_types()
    flat = FlatLogprobs()
    flat.append(None)  # position 0 is an empty range here, not None
    flat.append({8: Logprob(-1.25, rank=3), 2: Logprob(-0.5, rank=1)})
    lp, rank = actual_token_logprobs([1, 8], flat)
    assert np.isnan(lp[0])
    assert lp[1] == np.float32(-1.25) and rank[1] == 3


def test_missing_actual_token_or_wrong_length_is_an_error() -> None:
    Logprob, _ = vllm_logprob_types()
    with pytest.raises(RuntimeError, match="lack the actual token"):
        actual_token_logprobs([1, 8], [None, {3: Logprob(-0.1, rank=1)}])
    with pytest.raises(RuntimeError, match="3 tokens"):
        actual_token_logprobs([1, 8, 9], [None, {8: Logprob(-0.1, rank=1)}])


def test_cpu_env_defaults() -> None:
    env = cpu_env_defaults([2, 3])
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": "2-3"}


def test_missing_vllm_is_one_input_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from profit_prep.scorers.vllm_engine import VLLMScorer

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(InputError, match="cannot import vllm"):
        VLLMScorer(tmp_path, device="cpu")


def test_make_scorer_passes_engine_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import profit_prep.scorers.vllm_engine as backend

    seen = {}
    monkeypatch.setattr(backend, "VLLMScorer", lambda path, **kw: seen.update(kw) or "engine")
    config = ScoreConfig(data="x", out="y", backend="vllm", max_length=512,
                         gpu_memory_utilization=0.5, tensor_parallel_size=2,
                         max_num_batched_tokens=8192, enable_prefix_caching=True)
    assert make_scorer(config, Path("m")) == "engine"
    assert seen["max_model_len"] == 513
    assert seen["gpu_memory_utilization"] == 0.5 and seen["tensor_parallel_size"] == 2
    assert seen["max_num_batched_tokens"] == 8192 and seen["enable_prefix_caching"] is True


def test_gpu_default_max_num_batched_tokens_reaches_the_engine_and_the_manifest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On GPU with none given, the engine gets sizing's step budget and describe() says why;
    a user's value goes through untouched. (The engine is a stand-in: no GPU here.)"""
    import json

    import profit_prep.scorers.vllm_engine as backend
    from profit_prep.scorers.sizing import MiB, step_token_budget

    vllm_logprob_types()  # skips where vllm does not import
    import vllm

    seen: list[dict] = []

    class FakeLLM:
        def __init__(self, model: str, **options) -> None:
            seen.append(options)

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(backend, "gpu_total_memory", lambda: 81559 * MiB)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # V1: the runner whose step is bounded
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256,
                                                      "max_position_embeddings": 8192}))
    expected = step_token_budget(81559 * MiB, 128256, 0.85, "bfloat16").tokens
    scorer = backend.VLLMScorer(tmp_path, dtype="bfloat16", device="cuda",
                                gpu_memory_utilization=0.85, tensor_parallel_size=4)
    assert seen[-1]["max_num_batched_tokens"] == expected
    described = scorer.describe()
    assert described["device"] == "cuda" and described["max_num_batched_tokens"] == expected
    assert "128,256-token vocabulary in bfloat16" in described["max_num_batched_tokens_reason"]
    scorer = backend.VLLMScorer(tmp_path, dtype="bfloat16", device="cuda",
                                max_num_batched_tokens=2048)
    assert seen[-1]["max_num_batched_tokens"] == 2048
    assert scorer.describe()["max_num_batched_tokens_reason"] == "set by the user"


def test_an_engine_that_does_not_start_is_one_input_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """vLLM's start-up failure (here a stand-in's, spread over lines) becomes one line with its
    reason, not vLLM's traceback."""
    import json

    vllm_logprob_types()  # skips where vllm does not import
    import vllm

    class FailingLLM:
        def __init__(self, model: str, **options) -> None:
            raise RuntimeError("Engine core initialization failed.\n  See root cause above.")

    monkeypatch.setattr(vllm, "LLM", FailingLLM)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    from profit_prep.scorers.vllm_engine import VLLMScorer

    with pytest.raises(InputError) as caught:
        VLLMScorer(tmp_path, dtype="float32", device="cpu")
    assert str(caught.value) == ("--backend vllm: the engine did not start: Engine core "
                                 "initialization failed. See root cause above.")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# --------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def vllm_scorer(smollm2_dir: Path):
    from profit_prep.scorers.vllm_engine import VLLMScorer
    from tests.test_vllm_module_scan import hostile_module

    # As in a process that imported Flask (moto's S3 server does): vLLM-CPU's kernel scan trips.
    module = hostile_module()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, module.__name__, module)
        try:
            scorer = VLLMScorer(smollm2_dir, dtype="float32", max_model_len=1025, device="cpu",
                                signals=SIGNALS, top_k=TOP_K)
        except InputError as exc:
            vllm_logprob_types()  # no vLLM here: a skip; vLLM that does not start: a failure
            pytest.fail(f"vLLM imports but its engine did not start: {exc}")
    yield scorer
    scorer.close()


@pytest.fixture(scope="module")
def gsm8k_rendered(smollm2_tokenizer, gsm8k_rows) -> list:
    from profit_prep.inputs.formats import FieldMap, to_messages
    from profit_prep.rendering.renderer import Renderer, resolve_template

    template, _ = resolve_template(smollm2_tokenizer, None)
    renderer = Renderer(smollm2_tokenizer, template, 1024)
    fields = FieldMap("question", "answer")
    return [renderer.render(to_messages(r, "fields", fields)) for r in gsm8k_rows[:ROWS]]


@pytest.fixture(scope="module")
def transformers_signals(gsm8k_rendered, smollm2_dir: Path) -> list[dict[str, np.ndarray]]:
    """The transformers backend's logprobs and exact signals of the same rows."""
    from profit_prep.scorers.transformers_model import TransformersScorer

    scorer = TransformersScorer(smollm2_dir, signals=SIGNALS)
    return scorer.score_with_signals([r.input_ids for r in gsm8k_rendered])


@pytest.fixture(scope="module")
def plain_forward(gsm8k_rendered, smollm2_dir: Path) -> list[dict[str, np.ndarray]]:
    """Per row, from one plain forward's float64 log_softmax: the gold logprob, the top-k
    logprobs, and per position how many other tokens lie within 2e-3 of the gold and of the best
    (near-ties, where two backends' float noise may order tokens differently)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rows = []
    for r in gsm8k_rendered:
        x = torch.from_numpy(np.asarray(r.input_ids, np.int64))[None]
        with torch.inference_mode():
            logp = model(x).logits[0, :-1].double().log_softmax(-1)
        gold = logp.gather(1, x[0, 1:, None])
        top = logp.topk(TOP_K, -1).values
        rows.append({
            "gold": gold[:, 0].numpy(),
            "top": top.numpy(),
            "near_gold": ((logp - gold).abs() < 2e-3).sum(-1).numpy() - 1,
            "near_best": ((top[:, :1] - logp) < 2e-3).sum(-1).numpy() - 1,
        })
    return rows


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_matches_transformers_and_a_plain_forward(
    vllm_scorer, gsm8k_rendered, transformers_signals, plain_forward
) -> None:
    ids = [r.input_ids for r in gsm8k_rendered]
    got = vllm_scorer.score(ids)
    ref = [d["logprobs"] for d in transformers_signals]
    rule = MaskRule("higher", 0.1)
    worst_ref = worst_plain = 0.0
    agree = total = 0
    for seq, r, a, b, plain in zip(ids, gsm8k_rendered, got, ref, plain_forward, strict=True):
        assert a.dtype == np.float32 and a.shape == (len(seq),) and np.isnan(a[0])
        worst_ref = max(worst_ref, float(np.max(np.abs(a[1:] - b[1:]))))
        worst_plain = max(worst_plain, float(np.max(np.abs(a[1:] - plain["gold"]))))
        ma, mb = loss_mask(a, r.response_mask, rule), loss_mask(b, r.response_mask, rule)
        agree += int(np.sum(ma[r.response_mask] == mb[r.response_mask]))
        total += int(r.response_mask.sum())
    agreement = agree / total
    print(f"\nvLLM vs transformers max |dlogprob| {worst_ref:.2e}, vs plain forward "
          f"{worst_plain:.2e}; tau=0.1 mask agreement {agreement:.4%} of {total} tokens")
    assert worst_ref < 2e-3 and worst_plain < 2e-3
    assert agreement >= 0.999


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_ranks_with_top_k_and_edge_lengths(vllm_scorer, gsm8k_rendered) -> None:
    seq = gsm8k_rendered[0].input_ids
    base = vllm_scorer.score([seq, np.array([1], np.int32), np.array([], np.int32)])
    assert np.isnan(base[1]).all() and base[1].shape == (1,) and base[2].shape == (0,)
    saved = vllm_scorer.k
    try:  # k > 0: same values, and the rank of the actual token comes back
        vllm_scorer.k = 3
        [topk] = vllm_scorer.score([seq])
    finally:
        vllm_scorer.k = saved
    np.testing.assert_allclose(topk[1:], base[0][1:], atol=1e-4)
    ranks = vllm_scorer.last_ranks[0]
    assert ranks[0] == -1 and (ranks[1:] >= 1).all() and (ranks[1:] > 3).any()
    with pytest.raises(InputError, match="max_model_len"):
        vllm_scorer.score([np.ones(1025, np.int32)])


def lower_bound_entropy(top: np.ndarray) -> np.ndarray:
    """The top-k entropy estimator, written out independently: rows of top-k logprobs, sorted."""
    p = np.exp(top)
    tail = np.maximum(1 - p.sum(-1), 0)
    bound = np.maximum(np.minimum(tail, p[:, -1]), 1e-300)
    return -(p * top).sum(-1) + np.where(tail > 0, -tail * np.log(bound), 0)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_signals_match_transformers_and_the_top_k_estimate(
    vllm_scorer, gsm8k_rendered, transformers_signals, plain_forward
) -> None:
    got = vllm_scorer.score_with_signals([r.input_ids for r in gsm8k_rendered])
    errors, top1_near_ties, rank_near_ties, n = [], 0, 0, 0
    for g, ref, plain, r in zip(got, transformers_signals, plain_forward, gsm8k_rendered):
        assert g.keys() == ref.keys()  # same columns, dtypes and position-0 fill as transformers
        assert all(g[c].dtype == ref[c].dtype and g[c].shape == ref[c].shape for c in g)
        assert np.isnan(g["entropy"][0]) and g["top1_id"][0] == -1 and g["rank"][0] == -1
        # The estimator on the plain forward's own top-k: only float noise apart.
        np.testing.assert_allclose(g["entropy"][1:], lower_bound_entropy(plain["top"]), atol=1e-3)
        np.testing.assert_allclose(g["top1_logprob"][1:], plain["top"][:, 0], atol=2e-3)
        assert (g["entropy"][1:] <= ref["entropy"][1:] + 1e-3).all()  # a lower bound
        # Top-1 and rank: exact, except where tokens are within float noise of each other.
        top1_off = g["top1_id"][1:] != ref["top1_id"][1:]
        assert (plain["near_best"][top1_off] > 0).all()
        rank_off = np.abs(g["rank"][1:] - ref["rank"][1:])
        assert (rank_off <= plain["near_gold"]).all()
        top1_near_ties += int(top1_off.sum())
        rank_near_ties += int((rank_off > 0).sum())
        resp = r.response_mask[1:]
        errors.append(np.abs(g["entropy"][1:] - ref["entropy"][1:])[resp])
        n += len(g["rank"]) - 1
    err = np.concatenate(errors)
    print(f"\nvLLM top-{TOP_K} entropy error over {len(err)} response tokens: max {err.max():.3f}, "
          f"mean {err.mean():.4f} nats; top1/rank differ at {top1_near_ties}/{rank_near_ties} "
          f"of {n} positions (near-ties)")
    assert top1_near_ties + rank_near_ties <= n // 200
    # The error benchmarks/signals_error.py measured (docs/format.md), with a margin.
    assert err.mean() < MEAN_ERROR_BOUND and err.max() < MAX_ERROR_BOUND


# --------------------------------------------------------------------------- --backend auto


def _pretend_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as an AVX-512 CPU with vLLM, so that auto picks vLLM whatever runs the test."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    import profit_prep.scorers.choose

    monkeypatch.delenv("PROFIT_PREP_BACKEND", raising=False)
    monkeypatch.setattr(profit_prep.scorers.choose, "cpu_flags", lambda: {"avx2", "avx512f"})


def test_auto_falls_back_to_transformers_when_vllm_does_not_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    import json

    import profit_prep.scorers.vllm_engine
    from tests.conftest import score_demo

    _pretend_avx512(monkeypatch)

    def broken(self, *args, **kwargs):
        raise RuntimeError("engine core initialization failed")

    monkeypatch.setattr(profit_prep.scorers.vllm_engine.VLLMScorer, "__init__", broken)
    score_demo(tmp_path / "o", tiny_model_dir, limit=4, quiet=False)
    err = capsys.readouterr().err
    assert "backend     vllm (auto: AVX-512" in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "vLLM did not start" in warnings[0], err
    # What run.json and the manifest record is the backend that really scored.
    assert json.loads((tmp_path / "o" / "run.json").read_text())["backend"] == "transformers"
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["scorer"]["backend"] == "transformers"
    # A forced --backend vllm is not rescued: the user asked for that engine.
    with pytest.raises(RuntimeError, match="engine core"):
        score_demo(tmp_path / "o2", tiny_model_dir, limit=4, backend="vllm")


@pytest.mark.slow
@pytest.mark.vllm
def test_auto_scores_with_vllm_on_an_avx512_machine_as_transformers_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smollm2_dir: Path, capsys
) -> None:
    """The default command on an AVX-512 CPU: vLLM scores, within 1e-3 of transformers, and a
    resumed run keeps vLLM even where auto would now choose otherwise."""
    import json

    import pyarrow.parquet as pq

    from tests.conftest import score_demo

    _pretend_avx512(monkeypatch)
    score_demo(tmp_path / "auto", smollm2_dir, limit=6, quiet=False, max_length=512)
    assert "backend     vllm (auto: AVX-512" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["scorer"]["backend"] == "vllm"
    score_demo(tmp_path / "tf", smollm2_dir, limit=6, backend="transformers", max_length=512)
    a = pq.read_table(tmp_path / "auto" / "data").sort_by("source_index")
    b = pq.read_table(tmp_path / "tf" / "data").sort_by("source_index")
    assert a["input_ids"].to_pylist() == b["input_ids"].to_pylist()
    diff = max(float(np.nanmax(np.abs(np.array(x, np.float64) - np.array(y, np.float64))))
               for x, y in zip(a["logprobs"].to_pylist(), b["logprobs"].to_pylist()))
    assert diff < 1e-3
    (tmp_path / "auto" / "manifest.json").unlink()  # as if the run had stopped before the end
    monkeypatch.setattr("profit_prep.scorers.choose.cpu_flags", lambda: {"avx2"})
    score_demo(tmp_path / "auto", smollm2_dir, limit=6, quiet=False, max_length=512)
    assert "backend     vllm (auto: resuming" in capsys.readouterr().err
