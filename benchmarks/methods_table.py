"""Score demo rows once with SmolLM2 (--signals) and count the response tokens each method keeps.

Writes the markdown table of docs/methods.md to stdout (and --md FILE). The excess-loss rows
(Rho-1, token cleaning) need a second model's output of the same rows: ``--reference REF_OUT``, or
``--train-reference STEPS``, which builds Rho-1's setting in miniature: the reference is SmolLM2
after a short SFT on *other* GSM8K rows (clean in-domain data; all response tokens trained), the
model to be trained is SmolLM2 itself, and both score the same table rows.

Usage: python benchmarks/methods_table.py --rows 40 --work /tmp/methods [--train-reference 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from profit_prep import ScoreConfig, score
from profit_prep.cli import demo_data_path
from profit_prep.job import prepare, render_rows
from profit_prep.rules.selection import Select
from profit_prep.training.loader import load

TRAIN_FROM = 100  # reference SFT rows start here, clear of the scored table rows


def train_reference(work: Path, steps: int, batch_size: int = 4, lr: float = 1e-4) -> Path:
    """SmolLM2 after ``steps`` SFT steps on demo rows from TRAIN_FROM on; returns its folder."""
    import shutil

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from profit_prep.training.collate import PadCollator

    folder = work / "reference-model"
    if (folder / "config.json").exists():
        return folder
    config = ScoreConfig(data=demo_data_path(), out=str(work / "unused"), model="builtin:smollm2",
                         prompt_field="question", response_field="answer", quiet=True)
    prepared = prepare(config)
    rows = prepared.source.read(TRAIN_FROM, TRAIN_FROM + steps * batch_size)
    rendered, rejected = render_rows(rows, prepared.fmt, config.fields(), prepared.renderer)
    assert not rejected, rejected
    examples = [{"input_ids": r.input_ids.tolist(), "completion_mask": r.response_mask.tolist()}
                for _, r in rendered]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(work / "reference-run"), max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=lr,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=max(1, steps // 5), seed=0,
                             remove_unused_columns=False)
    # pad id 0: the collator finds padding from row lengths, never from the id
    Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(examples),
            data_collator=PadCollator(pad_token_id=0)).train()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json", "generation_config.json"):
        if (prepared.model_dir / name).exists():
            shutil.copy(prepared.model_dir / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--work", default="methods-work")
    parser.add_argument("--md", help="also write the table to this file")
    parser.add_argument("--reference", help="a second output of the same rows (excess-loss rows)")
    parser.add_argument("--train-reference", type=int, metavar="STEPS",
                        help="build the reference: SmolLM2 after STEPS SFT steps on other rows")
    args = parser.parse_args()
    work = Path(args.work)
    common = dict(data=demo_data_path(), model="builtin:smollm2", prompt_field="question",
                  response_field="answer", limit=args.rows, quiet=True)
    main_out = work / "smollm2-f32"
    ref_out = Path(args.reference) if args.reference else None
    if not (main_out / "manifest.json").exists():
        score(ScoreConfig(out=str(main_out), signals="entropy,top1,rank", **common))
    if args.train_reference:
        ref_model = train_reference(work, args.train_reference)
        ref_out = work / "reference-f32"
        if not (ref_out / "manifest.json").exists():
            score(ScoreConfig(out=str(ref_out), **{**common, "model": str(ref_model)}))

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
    lines = ["| method | profit-prep call | kept response tokens | share | same as ProFit |",
             "| --- | --- | ---: | ---: | ---: |"]
    profit = load(main_out, response_mask=True)
    profit_keep = np.concatenate([np.asarray(m, bool) for m in profit["completion_mask"]])
    response = np.concatenate([np.asarray(m, bool) for m in profit["response_mask"]])
    for name, call, spec in rows:
        if isinstance(spec, Select) and spec.signal == "excess_loss" and ref_out is None:
            continue
        if isinstance(spec, Select):
            ref = ref_out if spec.signal == "excess_loss" else None
            ds = load(main_out, select=spec, reference=ref, response_mask=True)
        else:
            ds = load(main_out, response_mask=True, **spec)
        keep = np.concatenate([np.asarray(m, bool) for m in ds["completion_mask"]])
        kept, total = int(keep.sum()), int(response.sum())
        # share of response tokens where this rule decides as ProFit's stored mask does
        same = float(np.mean(keep[response] == profit_keep[response]))
        lines.append(f"| {name} | `{call}` | {kept} / {total} | {kept / total:.1%} | "
                     f"{same:.1%} |")
    lines.append("")
    lines.append(f"{args.rows} bundled GSM8K rows, SmolLM2-135M-Instruct float32 with "
                 "`--signals entropy,top1,rank`."
                 + (f" *Reference: SmolLM2 after {args.train_reference} SFT steps (batch 4) on "
                    f"demo rows {TRAIN_FROM}+ (`--train-reference {args.train_reference}`)."
                    if args.train_reference else f" *Reference: {ref_out}." if ref_out else ""))
    table = "\n".join(lines)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main()
