"""Loader throughput: verify + read + re-threshold + write + memory-map, in tokens per second.

Builds a synthetic output in the real format (``format.to_table`` + ``output.OutputDir``), then
times ``profit_prep.training.loader.load`` from a cold loader cache (the cache file is deleted
before
every repeat, so each timing includes the whole path).

Run::

    python benchmarks/loader.py --tokens 1000000 --json benchmarks/loader.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from profit_prep.store.schema import ScoredExample, to_table
from profit_prep.store.writer import OutputDir


def build(out: Path, tokens: int, row_tokens: int, shards: int, seed: int = 0) -> int:
    """A scored output of about ``tokens`` tokens; returns the exact count."""
    rng = np.random.default_rng(seed)
    rows = max(1, tokens // row_tokens)
    per_shard = -(-rows // shards)
    total = 0
    with OutputDir(out).open({"benchmark": True}, overwrite=True) as od:
        for s in range(shards):
            examples = []
            for i in range(s * per_shard, min(rows, (s + 1) * per_shard)):
                n = int(rng.integers(row_tokens // 2, row_tokens * 3 // 2))
                prompt = int(rng.integers(1, n // 2))
                resp = np.arange(n) >= prompt
                lp = np.log(rng.uniform(1e-4, 1.0, n)).astype(np.float32)
                lp[0] = np.nan
                keep = resp & (np.exp(lp) >= 0.1)
                examples.append(ScoredExample(
                    str(i), i, rng.integers(0, 49152, n, dtype=np.int32), resp, lp, keep,
                    False, n))
                total += n
            od.write_shard(s, to_table(examples), [])
        od.finalize({"mask": {"strategy": "higher", "tau": 0.1}}, shards)
    return total


def time_load(out: Path, cache: Path, repeats: int, **kwargs: object) -> float:
    """Best wall time of ``load(out, **kwargs)`` from a cold loader cache."""
    import datasets

    from profit_prep.training.loader import load

    datasets.config.HF_DATASETS_CACHE = str(cache)
    best = float("inf")
    for _ in range(repeats):
        for f in (cache / "profit_prep").glob("*.arrow"):
            f.unlink()
        start = time.perf_counter()
        ds = load(out, **kwargs)
        best = min(best, time.perf_counter() - start)
        del ds
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--row-tokens", type=int, default=500)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "out", Path(tmp) / "cache"
        total = build(out, args.tokens, args.row_tokens, args.shards)
        time_load(out, cache, 1)  # warm imports and the page cache
        cases = {
            "stored_mask": {},
            "rethreshold_tau0.3": {"tau": 0.3},
            "rethreshold_tau0.3_labels_weights": {"tau": 0.3, "labels": True, "weights": "prob"},
            "random_0.5": {"strategy": "random", "keep_fraction": 0.5, "seed": 1},
        }
        result = {"tokens": total, "rows": max(1, args.tokens // args.row_tokens),
                  "shards": args.shards, "cases": {}}
        for name, kwargs in cases.items():
            seconds = time_load(out, cache, args.repeats, **kwargs)
            result["cases"][name] = {"seconds": round(seconds, 4),
                                     "tokens_per_s": round(total / seconds)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
