"""Measure the top-k entropy estimate of the vLLM backend against the exact entropy.

Renders demo GSM8K rows, scores them with the transformers backend (exact entropy over the full
vocabulary, top-1 and rank) and with the vLLM backend at each k (``--signals`` from ``k`` prompt
logprobs), and reports over response tokens: max and mean absolute entropy error (nats) of vLLM's
estimate, the same for other estimators computed in numpy from a plain forward's full
distribution (to justify the choice), and how often top-1 and rank differ from transformers.
Prints the figures and writes them to ``--json``.

Usage (from the repository root; ~5 min on 2 CPU cores):
    python benchmarks/signals_error.py --rows 20 --k 5,20 --json signals_error.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from profit_prep.cli import demo_data_path
from profit_prep.inputs.formats import FieldMap, to_messages
from profit_prep.rendering.renderer import Renderer, load_tokenizer, resolve_template
from profit_prep.scorers.base import TransformersScorer
from profit_prep.scorers.models import resolve_model
from profit_prep.scorers.top_k import TOP_K_ENTROPY, top_k_entropy

SIGNALS = "entropy,top1,rank"


def estimators(top: np.ndarray, vocab: int) -> dict[str, np.ndarray]:
    """Entropy estimates from top-k log-probabilities (rows sorted descending), float64."""
    p = np.exp(top)
    mass = p.sum(-1)
    tail = np.clip(1 - mass, 1e-300, None)
    head = -(p * top).sum(-1)
    return {
        "lower_bound (used)": top_k_entropy(top),
        "renormalised_top_k": -((p / mass[:, None]) * (top - np.log(mass)[:, None])).sum(-1),
        "tail_as_one_token": head - tail * np.log(tail),
        "tail_uniform": head - tail * np.log(tail / (vocab - top.shape[1])),
    }


def error(estimate: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    diff = np.abs(estimate - exact)
    return {
        "max_abs_nats": round(float(diff.max()), 4),
        "mean_abs_nats": round(float(diff.mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--k", default="5,20", help="comma list of top-k values")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--json", default="signals_error.json", help="where the figures go")
    args = parser.parse_args()
    ks = sorted({int(k) for k in args.k.split(",")})

    import torch
    from transformers import AutoModelForCausalLM

    from profit_prep.scorers.vllm_engine import VLLMScorer

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    template, _ = resolve_template(tokenizer, None)
    renderer = Renderer(tokenizer, template, args.max_length)
    lines = Path(demo_data_path()).read_text().splitlines()[: args.rows]
    rendered = [
        renderer.render(to_messages(json.loads(line), "fields", FieldMap("question", "answer")))
        for line in lines
    ]
    ids = [r.input_ids for r in rendered]
    # Response tokens, shifted: position t's signals describe the prediction of token t.
    resp = [r.response_mask[1:] for r in rendered]

    exact = TransformersScorer(model_dir, signals=SIGNALS).score_with_signals(ids)
    cat = {c: np.concatenate([e[c][1:][m] for e, m in zip(exact, resp)]) for c in exact[0]}

    # Full distribution of a plain forward: the other estimators, at every k.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tops: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for seq, m in zip(ids, resp):
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(seq, np.int64))[None]
            logp = model(x).logits[0, :-1].double().log_softmax(-1)[torch.from_numpy(m)]
        for k in ks:
            tops[k].append(logp.topk(k, -1).values.numpy())
    vocab = model.config.vocab_size
    del model

    scorer = VLLMScorer(
        model_dir,
        dtype="float32",
        max_model_len=args.max_length + 1,
        signals=SIGNALS,
        top_k=max(ks),
    )
    report: dict = {
        "model": str(model_dir),
        "rows": len(ids),
        "response_tokens": int(len(cat["entropy"])),
        "exact_entropy_mean_nats": round(float(cat["entropy"].mean()), 4),
        "estimator": TOP_K_ENTROPY,
        "by_k": {},
    }
    try:
        for k in ks:
            scorer.top_k = k  # one engine for every k: the request asks for k per call
            got = scorer.score_with_signals(ids)
            est = {c: np.concatenate([g[c][1:][m] for g, m in zip(got, resp)]) for c in got[0]}
            top = np.concatenate(tops[k])
            numpy_est = estimators(top, vocab)
            report["by_k"][k] = {
                "vllm": {
                    **error(est["entropy"], cat["entropy"]),
                    "max_abs_vs_numpy_same_estimator": round(
                        float(np.abs(est["entropy"] - numpy_est["lower_bound (used)"]).max()), 5
                    ),
                    "above_exact_by_more_than_1e-3": int(
                        np.sum(est["entropy"] > cat["entropy"] + 1e-3)
                    ),
                    "top1_id_differs": int(np.sum(est["top1_id"] != cat["top1_id"])),
                    "rank_differs": int(np.sum(est["rank"] != cat["rank"])),
                    "top_k_mass_mean": round(float(np.exp(top).sum(-1).mean()), 4),
                },
                "numpy_estimators": {
                    name: error(e, cat["entropy"]) for name, e in numpy_est.items()
                },
            }
    finally:
        scorer.close()
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.json).write_text(text + "\n")


if __name__ == "__main__":  # the guard vLLM needs if it ever runs with multiprocessing on
    main()
