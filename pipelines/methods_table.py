"""Score demo rows once with SmolLM2 (--signals) and count the response tokens each method keeps.

Writes the markdown table of docs/methods.md to stdout (and --md FILE). The excess-loss rows need a
second model's output of the same rows (``--reference REF_OUT``, e.g. SmolLM2 scored in bfloat16 as
a stand-in, which is slow on CPU); without it they are left out.

Usage: python pipelines/methods_table.py --rows 40 --work /tmp/methods [--reference REF_OUT]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from profit_prep import ScoreConfig, score
from profit_prep.cli import demo_data_path
from profit_prep.loading import load
from profit_prep.rules import Select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--work", default="methods-work")
    parser.add_argument("--md", help="also write the table to this file")
    parser.add_argument("--reference", help="a second output of the same rows (excess-loss rows)")
    args = parser.parse_args()
    work = Path(args.work)
    common = dict(data=demo_data_path(), model="builtin:smollm2", prompt_field="question",
                  response_field="answer", limit=args.rows, quiet=True)
    main_out = work / "smollm2-f32"
    ref_out = Path(args.reference) if args.reference else None
    if not (main_out / "manifest.json").exists():
        score(ScoreConfig(out=str(main_out), signals="entropy,top1,rank", **common))

    rows: list[tuple[str, str, object]] = [
        ("ProFit (p >= 0.1, stored mask)", "load(OUT)", {}),
        ("ProFit tau = 0.3", "load(OUT, tau=0.3)", {"tau": 0.3}),
        ("DFT (all tokens, weight p)", 'load(OUT, tau=0.0, weights="prob")',
         {"tau": 0.0, "weights": "prob"}),
        ("Top 50% prob per example", 'Select("top", "prob", fraction=0.5)',
         Select("top", "prob", fraction=0.5)),
        ("Top 50% prob, whole dataset", 'Select("top", "prob", 0.5, scope="global")',
         Select("top", "prob", fraction=0.5, scope="global")),
        ("Entropy band [0.5, 3] nats", 'Select("band", "entropy", lo=0.5, hi=3)',
         Select("band", "entropy", lo=0.5, hi=3.0)),
        ("Top 20% entropy (forking tokens)", 'Select("top", "entropy", 0.2, scope="global")',
         Select("top", "entropy", fraction=0.2, scope="global")),
        ("Rho-1: top 60% excess loss per example*",
         'Select("top", "excess_loss", 0.6), reference=REF',
         Select("top", "excess_loss", fraction=0.6)),
        ("Token cleaning: top 60% excess loss, global*",
         'Select("top", "excess_loss", 0.6, scope="global"), reference=REF',
         Select("top", "excess_loss", fraction=0.6, scope="global")),
    ]
    lines = ["| method | profit-prep call | kept response tokens | share |",
             "| --- | --- | ---: | ---: |"]
    for name, call, spec in rows:
        if isinstance(spec, Select) and spec.signal == "excess_loss" and ref_out is None:
            continue
        if isinstance(spec, Select):
            ref = ref_out if spec.signal == "excess_loss" else None
            ds = load(main_out, select=spec, reference=ref, response_mask=True)
        else:
            ds = load(main_out, response_mask=True, **spec)
        kept = sum(int(np.sum(m)) for m in ds["completion_mask"])
        total = sum(int(np.sum(m)) for m in ds["response_mask"])
        lines.append(f"| {name} | `{call}` | {kept} / {total} | {kept / total:.1%} |")
    lines.append("")
    lines.append(f"{args.rows} bundled GSM8K rows, SmolLM2-135M-Instruct float32 with "
                 "`--signals entropy,top1,rank`."
                 + (f" *Reference: {ref_out}." if ref_out else ""))
    table = "\n".join(lines)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
