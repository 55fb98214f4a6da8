"""GPU sizing: the default max_num_batched_tokens, run plans, and the doc tables they print."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from profit_prep.scorers.sizing import (
    MAX_BATCHED_TOKENS,
    MIN_BATCHED_TOKENS,
    ROUND_TO,
    V2_PROMPT_LOGPROB_CHUNK,
    GiB,
    GpuSpec,
    MiB,
    ModelSpec,
    logit_entry_bytes,
    plan_run,
    step_token_budget,
)
from profit_prep.scorers.vllm_engine import choose_max_num_batched_tokens, model_runner

REPO = Path(__file__).resolve().parent.parent
H100 = 81559 * MiB  # NVML's total for an H100 80GB

MEMORIES = [16 * GiB, 24 * GiB, H100, 143771 * MiB]
VOCABS = [32000, 49152, 128256, 151936, 256000]
UTILS = [0.5, 0.8, 0.85, 0.9, 0.95, 0.98]


def test_budget_is_the_largest_rounded_step_whose_logits_fit() -> None:
    for memory, vocab, util, dtype in itertools.product(MEMORIES, VOCABS, UTILS,
                                                        ("bfloat16", "float32")):
        b = step_token_budget(memory, vocab, util, dtype)
        per_token = vocab * (2 if dtype == "bfloat16" else 4) + vocab * 4
        headroom = memory * (1 - util) - GiB
        assert b.bytes_per_token == per_token
        assert b.tokens % ROUND_TO == 0 and MIN_BATCHED_TOKENS <= b.tokens <= MAX_BATCHED_TOKENS
        if MIN_BATCHED_TOKENS < b.tokens < MAX_BATCHED_TOKENS:  # not clamped: tight, and fits
            assert b.tokens * per_token <= headroom < (b.tokens + ROUND_TO) * per_token
            assert "rounded down" in b.reason
        assert (b.peak_bytes <= b.headroom_bytes) == (b.fits >= b.tokens)


def test_budget_is_monotonic() -> None:
    def tokens(**kw: float | str) -> list[int]:
        base = {"gpu_memory_bytes": H100, "vocab_size": 128256, "gpu_memory_utilization": 0.9,
                "dtype": "bfloat16"}
        key, values = next((k, v) for k, v in kw.items())
        return [step_token_budget(**{**base, key: v}).tokens for v in values]

    def non_increasing(xs: list[int]) -> bool:
        return all(a >= b for a, b in itertools.pairwise(xs))

    memory = tokens(gpu_memory_bytes=[g * GiB for g in range(16, 200, 8)])
    assert memory == sorted(memory) and len(set(memory)) > 3  # more memory, bigger steps
    assert non_increasing(tokens(vocab_size=[32000, 64000, 128256, 151936, 256000]))
    assert non_increasing(tokens(gpu_memory_utilization=list(np.arange(0.5, 0.99, 0.01))))
    [bf16, fp32] = tokens(dtype=["bfloat16", "float32"])
    assert fp32 < bf16


def test_clamps_and_what_they_say() -> None:
    low = step_token_budget(24 * GiB, 151936, 0.97)  # 0.7 GiB free - 1 GiB margin: nothing
    assert low.fits <= 0 and low.tokens == MIN_BATCHED_TOKENS
    assert low.peak_bytes > low.headroom_bytes and "raised to vLLM's minimum" in low.reason
    high = step_token_budget(143771 * MiB, 49152, 0.5)
    assert high.fits > MAX_BATCHED_TOKENS and high.tokens == MAX_BATCHED_TOKENS
    assert "capped" in high.reason
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        step_token_budget(H100, 128256, 0.0)


LLAMA_70B = ModelSpec("70B", 70e9, layers=80, kv_heads=8, head_dim=128, vocab=128256)


def test_tensor_parallel_splits_weights_and_kv_not_the_logits() -> None:
    gpu = GpuSpec("H100", H100)
    kw = {"gpus": 8, "rows": 1000, "tokens_per_row": 500, "gpu_tokens_per_s": 2826.0}
    tp4, tp8 = (plan_run(LLAMA_70B, gpu, tensor_parallel_size=t, **kw) for t in (4, 8))
    assert (tp4.num_workers, tp8.num_workers) == (2, 1)
    assert tp4.weights_bytes == 2 * tp8.weights_bytes == 70e9 * 2 / 4
    assert tp4.kv_step_bytes == 2 * tp8.kv_step_bytes
    # Every rank all-gathers the full-vocabulary logits: the same step budget and peak per GPU.
    assert tp4.max_num_batched_tokens == tp8.max_num_batched_tokens
    assert tp4.logits_peak_bytes == tp8.logits_peak_bytes
    assert tp4.hours == tp8.hours  # the same GPUs at the same per-GPU rate
    # More TP ranks than KV heads: vLLM replicates a head, it does not split it.
    assert LLAMA_70B.kv_bytes_per_token(16) == LLAMA_70B.kv_bytes_per_token(8)
    with pytest.raises(ValueError, match="do not split"):
        plan_run(LLAMA_70B, gpu, tensor_parallel_size=3, **kw)


def test_plan_scales_and_flags_what_does_not_fit() -> None:
    gpu = GpuSpec("H100", H100)
    kw = {"rows": 10_000, "tokens_per_row": 500, "gpu_tokens_per_s": 25_000.0}
    model = ModelSpec("8B", 8e9, layers=32, kv_heads=8, head_dim=128, vocab=128256)
    one, eight = (plan_run(model, gpu, gpus=g, tensor_parallel_size=1, **kw) for g in (1, 8))
    assert one.hours == pytest.approx(8 * eight.hours)
    assert one.tokens == 5e6 and one.tokens / (one.hours * 3600) == pytest.approx(25_000)
    # Render actors: enough that their capacity covers the cluster's demand, and no more.
    fast = plan_run(model, gpu, gpus=8, tensor_parallel_size=1, render_tokens_per_s=60_000, **kw)
    assert fast.render_actors == 4 and 0.75 < fast.render_load <= 1  # 200k/s over 60k actors
    assert one.fits and one.spare_bytes > 50e9
    # A 70B on one 80 GB GPU: the weights alone exceed vLLM's budget.
    assert not plan_run(LLAMA_70B, gpu, gpus=1, tensor_parallel_size=1, **kw).fits


def write_config(folder: Path, **config: int) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_choose_applies_the_default_only_on_gpu(tmp_path: Path) -> None:
    model = write_config(tmp_path / "m", vocab_size=128256)
    kw = {"model_dir": model, "dtype": "bfloat16", "gpu_memory_utilization": 0.9,
          "total_memory": H100}
    value, reason = choose_max_num_batched_tokens(None, on_cpu=False, **kw)
    assert value == step_token_budget(H100, 128256, 0.9).tokens
    assert "128,256-token vocabulary" in reason and "GiB free" in reason
    assert choose_max_num_batched_tokens(4096, on_cpu=False, **kw) == (4096, "set by the user")
    value, reason = choose_max_num_batched_tokens(None, on_cpu=True, **kw)
    assert value is None and "CPU" in reason
    # Multimodal configs keep the vocabulary under text_config.
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 262144}}))
    value, _ = choose_max_num_batched_tokens(None, on_cpu=False, **{**kw, "model_dir": mm})
    assert value == step_token_budget(H100, 262144, 0.9).tokens
    for missing in ({"model_dir": tmp_path / "none"}, {"total_memory": None}):
        value, reason = choose_max_num_batched_tokens(None, on_cpu=False, **{**kw, **missing})
        assert value is None and "unknown" in reason


def test_docs_hold_the_tables_gpu_plan_prints() -> None:
    """docs/scaling.md's sizing table and worked plans are benchmarks/gpu_plan.py's output."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_plan

    doc = (REPO / "docs" / "scaling.md").read_text().splitlines()
    for line in gpu_plan.sizing_table() + gpu_plan.plans_table():
        assert line in doc, f"docs/scaling.md lacks (rerun benchmarks/gpu_plan.py): {line}"


def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    """No GPU: one line of JSON, exit 0, and no CUDA question asked the fork-unsafe way."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = proc.stdout.splitlines()
    said = json.loads(line)
    assert said["complete"] is True and said["skipped"].startswith("no CUDA device")
    assert json.loads(out.read_text()) == said


def test_gpu_check_picks_a_tensor_parallel_size_the_heads_split_into(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import tensor_parallel

    smol = write_config(tmp_path / "smol", num_attention_heads=9, num_key_value_heads=3)
    llama = write_config(tmp_path / "llama", num_attention_heads=32, num_key_value_heads=8)
    assert tensor_parallel(llama, 2)[0] == 2 and tensor_parallel(llama, 8)[0] == 2
    assert tensor_parallel(smol, 2) == (None, tensor_parallel(smol, 2)[1])
    assert "do not split" in tensor_parallel(smol, 2)[1]
    assert tensor_parallel(smol, 3)[0] == 3
    assert tensor_parallel(llama, 1)[1] == "skipped: 2 GPUs needed, 1 visible"


def test_gpu_plan_prints_both_runners() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_plan

    sizing, plans = gpu_plan.sizing_table()[2:], gpu_plan.plans_table()[2:]
    assert len(sizing) == 2 * len(gpu_plan.SIZING_ROWS)
    assert len(plans) == 2 * len(gpu_plan.PLANS)
    for rows in (sizing, plans):
        assert [r.split("|")[5 if rows is sizing else 2].strip() for r in rows] == [
            "V2", "V1"] * (len(rows) // 2)


def test_gpu_configs_leave_the_step_to_the_sizing_default() -> None:
    """The GPU pipeline configs set no --max-num-batched-tokens (the runner-aware default
    applies) and no fixed dtype (auto: bf16 on the GPUs)."""
    sys.path.insert(0, str(REPO / "pipelines"))
    from load_config import load

    configs = sorted((REPO / "pipelines" / "configs").glob("*gpu*.yaml"))
    assert configs
    for path in configs:
        config = load(path)
        assert config.max_num_batched_tokens is None, path.name
        assert config.dtype == "auto", path.name


def test_gpu_check_compare() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import compare

    ref = [np.array([np.nan, -0.05, -3.0, -1.0], np.float32), np.array([np.nan, -2.0], np.float32)]
    resp = [np.array([False, True, True, True]), np.array([False, True])]
    same = compare(ref, [r.copy() for r in ref], resp)
    assert same == {"max_abs_dlogprob": 0.0, "mask_agreement": 1.0, "response_tokens": 4}
    # -3.0 -> -2.4 stays below p = 0.1 (masked either way); -0.05 -> -2.5 crosses tau = 0.1.
    moved = [np.array([np.nan, -2.5, -2.4, -1.0], np.float32), ref[1]]
    got = compare(ref, moved, resp)
    assert got["max_abs_dlogprob"] == pytest.approx(2.45)
    assert got["mask_agreement"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="logprobs"):
        compare(ref, [ref[0][:2], ref[1]], resp)


def test_docstring_examples() -> None:
    import doctest

    import profit_prep.scorers.sizing

    failed, attempted = doctest.testmod(profit_prep.scorers.sizing)
    assert attempted >= 3 and failed == 0


# --------------------------------------------------------------------------- model runners


@pytest.mark.parametrize(("memory", "vocab", "util"),
                         list(itertools.product(MEMORIES, VOCABS, UTILS)))
def test_v2_keeps_vllms_step_and_its_peak_is_one_chunk(memory: int, vocab: int,
                                                       util: float) -> None:
    """Model Runner V2 scores prompt logprobs 1,024 tokens at a time with no fp32 log-softmax:
    its peak is one chunk's logits, the same at every step size, and the step stays vLLM's."""
    for dtype in ("bfloat16", "float32"):
        v2 = step_token_budget(memory, vocab, util, dtype, runner="v2")
        assert v2.tokens == (16384 if memory >= 70 * GiB else 8192)
        assert v2.peak_bytes == V2_PROMPT_LOGPROB_CHUNK * vocab * {"bfloat16": 2,
                                                                   "float32": 4}[dtype]
        v1 = step_token_budget(memory, vocab, util, dtype, runner="v1")
        assert v1.peak_bytes == v1.tokens * vocab * logit_entry_bytes(dtype)
        assert v2.peak_bytes < v1.peak_bytes  # no full log-softmax, a chunk not the step
        fits = v2.peak_bytes <= v2.headroom_bytes
        assert ("does not fit" in v2.reason) is not fits
        assert "1,024 tokens at a time" in v2.reason


def test_the_issues_h100_figures_for_both_runners() -> None:
    """H100 80GB, Llama-3's vocabulary, bf16, 0.9: V1's bound 9,472; V2 vLLM's 16,384."""
    assert step_token_budget(H100, 128256, 0.9, runner="v1").tokens == 9472
    v2 = step_token_budget(H100, 128256, 0.9, runner="v2")
    assert v2.tokens == 16384 and v2.peak_bytes == 1024 * 128256 * 2
    with pytest.raises(ValueError, match="model runner"):
        step_token_budget(H100, 128256, 0.9, runner="v3")


def test_choose_on_v2_leaves_the_step_to_vllm(tmp_path: Path) -> None:
    model = write_config(tmp_path / "m", vocab_size=152064)
    value, reason = choose_max_num_batched_tokens(
        None, on_cpu=False, model_dir=model, dtype="bfloat16", gpu_memory_utilization=0.85,
        total_memory=H100, runner="v2")
    assert value is None and "vLLM's default" in reason and "1,024 tokens" in reason
    assert choose_max_num_batched_tokens(
        None, on_cpu=False, model_dir=model, dtype="bfloat16", gpu_memory_utilization=0.85,
        total_memory=H100, runner="v1")[0] == step_token_budget(H100, 152064, 0.85).tokens


@pytest.mark.parametrize("forced", [None, "0", "1"])
@pytest.mark.parametrize("triton", [False, True])
def test_model_runner_decides_as_vllm_does(monkeypatch: pytest.MonkeyPatch,
                                           forced: str | None, triton: bool) -> None:
    """Our prediction against vLLM's own ``VllmConfig.use_v2_model_runner`` (the installed
    source, evaluated for a config with nothing that forces either runner)."""
    import importlib.util
    import types

    vllm_config = pytest.importorskip("vllm.config.vllm")
    if forced is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", forced)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if triton else None) if name == "triton" else real_find_spec(name, *a)))
    monkeypatch.setattr(vllm_config, "HAS_TRITON", triton)
    plain = types.SimpleNamespace(
        attention_config=types.SimpleNamespace(hisparse_config=None), watermark_config=None,
        _get_v2_model_runner_unsupported_features=lambda: [])
    theirs = vllm_config.VllmConfig.use_v2_model_runner.fget(plain)
    ours, why = model_runner(on_cpu=False)
    assert ours == ("v2" if theirs else "v1"), why
    if forced is not None:
        assert why == f"$VLLM_USE_V2_MODEL_RUNNER={forced}"


def test_plans_for_both_runners() -> None:
    spec = ModelSpec("70B", 70e9, layers=80, kv_heads=8, head_dim=128, vocab=128256)
    gpu = GpuSpec("H100", H100)
    v1, v2 = (plan_run(spec, gpu, gpus=8, tensor_parallel_size=4, rows=1000, tokens_per_row=500,
                       gpu_tokens_per_s=1000.0, runner=r) for r in ("v1", "v2"))
    assert (v1.runner, v2.runner) == ("v1", "v2")
    assert v2.max_num_batched_tokens == 16384 > v1.max_num_batched_tokens
    assert v2.logits_peak_bytes < v1.logits_peak_bytes
    assert v2.kv_step_bytes > v1.kv_step_bytes  # a bigger step holds more KV
