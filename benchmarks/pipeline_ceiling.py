"""The pipeline's own ceiling: everything but the model, with the null scorer (issue 15, part 1).

Scores a synthetic JSONL (the bundled GSM8K rows repeated under new ids) with ``--backend null``
(every logprob 0, no model): read, render (chat template + tokenize), mask, Parquet write,
manifest, progress; once in this process and on Ray with 1, 2 and 4 render actors
(``--render-workers``; one null scoring actor, as rendering is what is measured). Prints
tokens/s, writes them as JSON, and sets them beside what one GPU scoring a reference model would
ask of the pipeline (``2 x params`` FLOP per token at an assumed MFU of an H100's dense bf16 peak).

    python benchmarks/pipeline_ceiling.py --rows 20000 --json ceiling.json
    python benchmarks/pipeline_ceiling.py --rows 2000 --no-ray    # a quick look

Ratios measured in one run are what to compare (absolute speeds move with the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 tensor cores
ASSUMED_MFU = 0.4  # a good prefill-only scoring run; stated, not measured here
MODELS = {"SmolLM2-135M": 135e6, "8B": 8e9, "70B": 70e9}
RENDER_ACTORS = (1, 2, 4)


def gpu_demand(params: float, gpus: int = 1) -> float:
    """Tokens/s that ``gpus`` GPUs scoring a ``params`` model consume: MFU x peak / (2 x params).

    >>> round(gpu_demand(8e9))
    24725
    """
    return gpus * ASSUMED_MFU * H100_BF16_DENSE_FLOPS / (2 * params)


def synthetic_rows(path: Path, rows: int) -> Path:
    """``rows`` GSM8K rows (the bundled 300, repeated) as JSONL, each with its own id."""
    demo = (ROOT / "profit_prep" / "data" / "gsm8k_demo.jsonl").read_text().splitlines()
    with path.open("w") as f:
        for i in range(rows):
            row = json.loads(demo[i % len(demo)])
            row["id"] = f"row-{i}"
            f.write(json.dumps(row) + "\n")
    return path


def timed_run(
    data: Path, out: Path, tokenizer_dir: Path, render_workers: int | None
) -> dict[str, Any]:
    """One run: in this process (``render_workers`` None), or on Ray with that many render
    actors and one null scoring actor."""
    from profit_prep import ScoreConfig, score
    from profit_prep.executors.ray import score_with_ray

    ray = render_workers is not None
    config = ScoreConfig(data=str(data), out=str(out), model=str(tokenizer_dir),
                         prompt_field="question", response_field="answer", backend="null",
                         shard_size=1000, num_workers=1 if ray else 0,
                         render_workers=render_workers, quiet=True, overwrite=True)
    t0 = time.perf_counter()
    summary = score_with_ray(config) if ray else score(config)
    wall = time.perf_counter() - t0
    # Steady rates, without the fixed start (tokenizer load, Ray start, actor start): in process
    # the shards' own read+render+score+write time; on Ray the rate between the first shard
    # and the last (the driver's steady_tokens_per_s).
    if ray:
        rate = summary.get("steady_tokens_per_s") or summary["tokens"] / summary["ray_execution_s"]
    else:
        rate = summary["tokens"] / sum(summary[k] for k in ("read_s", "render_s", "score_s",
                                                             "write_s"))
    return {"render_workers": render_workers, "rows": summary["scored_rows"],
            "tokens": summary["tokens"],
            "wall_s": round(wall, 2), "tokens_per_s": round(rate),
            "rows_per_s": round(rate * summary["scored_rows"] / summary["tokens"], 1),
            "end_to_end_tokens_per_s": round(summary["tokens"] / wall),
            "timing": {k: summary.get(k) for k in ("read_s", "render_s", "score_s", "write_s")}}


def measure(
    rows: int, render_actors: tuple[int, ...] = RENDER_ACTORS, tokenizer_dir: Path | None = None
) -> dict[str, Any]:
    """The in-process run and one Ray run per number of render actors; the figures."""
    from profit_prep.scorers.models import convert_smollm2

    tokenizer_dir = tokenizer_dir or convert_smollm2()
    work = Path(tempfile.mkdtemp(prefix="profit-ceiling-"))
    try:
        data = synthetic_rows(work / "rows.jsonl", rows)
        runs = [timed_run(data, work / "out0", tokenizer_dir, None)]
        runs += [timed_run(data, work / f"out{n}", tokenizer_dir, n) for n in render_actors]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single = runs[0]["tokens_per_s"]
    res: dict[str, Any] = {
        "rows": rows, "cores": os.cpu_count(), "runs": runs,
        "pipeline_ceiling_tokens_per_s": single,
        "gpu_demand_assumption": f"MFU {ASSUMED_MFU} x H100 dense bf16 {H100_BF16_DENSE_FLOPS:.3g}"
                                 " FLOP/s / (2 x params) tokens/s per GPU",
        "gpu_demand_tokens_per_s": {m: round(gpu_demand(p)) for m, p in MODELS.items()},
    }
    on_ray = {r["render_workers"]: r["tokens_per_s"] for r in runs[1:]}
    for n in render_actors:
        if n != 1 and 1 in on_ray:  # Ray with n render actors over Ray with one
            res[f"pipeline_ceiling_scaling_{n}"] = round(on_ray[n] / on_ray[1], 3)
    res["gpus_fed_by_one_process"] = {m: round(single / d, 2)
                                      for m, d in res["gpu_demand_tokens_per_s"].items()}
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--no-ray", action="store_true", help="only the in-process run")
    parser.add_argument("--render-workers", type=int, nargs="+", default=list(RENDER_ACTORS),
                        help="render actors of each Ray run")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    res = measure(args.rows, () if args.no_ray else tuple(args.render_workers))
    for r in res["runs"]:
        n = r["render_workers"]
        where = "in process" if n is None else f"Ray, {n} render actor(s)"
        print(f"{where:24s} {r['tokens_per_s']:>9,d} tokens/s  {r['rows_per_s']:>8.1f} rows/s")
    for m, d in res["gpu_demand_tokens_per_s"].items():
        print(f"one H100 scoring {m:13s} asks {d:>10,d} tokens/s: one process feeds "
              f"{res['gpus_fed_by_one_process'][m]} of them")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
