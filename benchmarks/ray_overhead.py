"""Ray's overhead: rows/s of the Ray pipeline (1 and 2 workers) against the bare scorer loop.

The bare loop is what a Ray scoring actor does with no Ray around it: one scorer, the same
rendered rows, scored shard by shard. Ray adds rendering and writing in actors, pickling, object
transfer and its scheduler. Each Ray run starts its own local cluster, as ``profit-prep score
--num-workers N`` does. "steady" rates start once every worker has finished a shard (no Ray
start, no model load: both one-off); "end-to-end" include them.

Bare and Ray runs alternate (``--rounds`` times: bare, Ray 1, Ray 2, ..., then a last bare), so
load from other tenants of a shared machine hits both alike. Each Ray run is compared with the
mean of the bare passes before and after it: ``overhead = 1 - ray steady tokens/s / that mean``;
the figure to quote is the median over rounds. The overhead against the fastest bare pass of the
whole run is printed beside it (the pessimistic reading).

Usage (from the repository root; prints and writes JSON)::

    python benchmarks/ray_overhead.py --rows 64 --shard-size 8 --json ray_overhead.json
    python benchmarks/ray_overhead.py --backend vllm --workers 1 --rounds 1

Numbers are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from profit_prep.config import ScoreConfig  # noqa: E402
from profit_prep.executors.ray import score_with_ray  # noqa: E402
from profit_prep.job import prepare, render_rows  # noqa: E402
from profit_prep.scorers.choose import make_scorer  # noqa: E402


def base_config(args: argparse.Namespace, out: str, workers: int) -> ScoreConfig:
    return ScoreConfig(
        data=args.data, out=out, model=args.model, prompt_field="question",
        response_field="answer", limit=args.rows, shard_size=args.shard_size,
        backend=args.backend, max_length=args.max_length, num_workers=workers, quiet=True,
        overwrite=True,
    )


def bare_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The scorer alone, on the same shards, in this process."""
    config = base_config(args, "unused", 0)
    prepared = prepare(config)
    shards = []
    for index in range(prepared.n_shards):
        rows = prepared.source.read(*prepared.shard_range(index))
        rendered, _ = render_rows(rows, prepared.fmt, config.fields(), prepared.renderer)
        shards.append([r.input_ids for _, r in rendered])
    t0 = time.perf_counter()
    scorer = make_scorer(config, prepared.model_dir)
    load_s = time.perf_counter() - t0
    scorer.score(shards[0][:1])  # warm-up, as the first Ray shard pays it too (kept below)
    t0 = time.perf_counter()
    for ids in shards:
        scorer.score(ids)
    score_s = time.perf_counter() - t0
    scorer.close()
    n_rows = sum(len(s) for s in shards)
    tokens = sum(len(i) for s in shards for i in s)
    return {"rows": n_rows, "tokens": tokens, "model_load_s": round(load_s, 2),
            "score_s": round(score_s, 2), "rows_per_s": round(n_rows / score_s, 3),
            "tokens_per_s": round(tokens / score_s, 1)}


def ray_run(args: argparse.Namespace, workers: int, out: str) -> dict[str, Any]:
    summary = score_with_ray(base_config(args, out, workers))
    steady = summary["steady_tokens_per_s"]
    return {
        "workers": workers,
        "rows": summary["scored_rows"],
        "tokens": summary["tokens"],
        "ray_execution_s": summary["ray_execution_s"],
        "model_load_s": summary["model_load_s"],
        "after_load_tokens_per_s": summary["tokens_per_s"],
        "steady_tokens_per_s": steady,
        "steady_rows_per_s": round(steady * summary["scored_rows"] / summary["tokens"], 3),
        "end_to_end_rows_per_s": round(summary["scored_rows"] / summary["wall_s"], 3),
        "actor_scoring_tokens_per_s": summary["worker_tokens_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "profit_prep" / "data" / "gsm8k_demo.jsonl"))
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="ray_overhead.json")
    args = parser.parse_args()
    if -(-args.rows // args.shard_size) <= max(args.workers):
        # the steady rate starts after every worker's first shard: it needs one more than that
        parser.error("--rows / --shard-size must give more shards than the most --workers")

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "loadavg_start": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "bare": [],
        "ray": [],
    }

    def bare() -> float:
        run = bare_loop(args)
        result["bare"].append(run)
        print("bare loop:", run, flush=True)
        return float(run["tokens_per_s"])

    before = bare()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            runs = []
            for workers in args.workers:
                run = {"round": round_, **ray_run(args, workers, os.path.join(tmp, f"w{workers}"))}
                runs.append(run)
                print(f"ray {workers} worker(s):", run, flush=True)
            after = bare()
            around = (before + after) / 2  # the bare passes either side of this round
            for run in runs:
                run["bare_tokens_per_s"] = round(around, 1)
                run["overhead_vs_bare"] = round(1 - run["steady_tokens_per_s"] / around, 3)
            result["ray"] += runs
            before = after

    fastest = max(b["tokens_per_s"] for b in result["bare"])
    result["summary"] = {}
    for workers in args.workers:
        runs = [r for r in result["ray"] if r["workers"] == workers]
        median = float(np.median([r["overhead_vs_bare"] for r in runs]))
        worst = 1 - min(r["steady_tokens_per_s"] for r in runs) / fastest
        summary = {
            "median_overhead_vs_bare": round(median, 3),
            "overheads": [r["overhead_vs_bare"] for r in runs],
            "worst_overhead_vs_fastest_bare": round(worst, 3),
            "steady_rows_per_s": [r["steady_rows_per_s"] for r in runs],
            "end_to_end_rows_per_s": [r["end_to_end_rows_per_s"] for r in runs],
        }
        result["summary"][str(workers)] = summary
        each = ", ".join(f"{o:+.1%}" for o in summary["overheads"])
        print(f"{workers} worker(s): overhead vs bare {each} (median {median:+.1%}; slowest run "
              f"vs fastest bare pass {worst:+.1%}); steady rows/s {summary['steady_rows_per_s']}")
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
