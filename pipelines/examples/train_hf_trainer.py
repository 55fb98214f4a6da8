"""Train with the plain HF Trainer on ProFit masks: a ``labels`` column with -100 off the mask.

    python pipelines/examples/train_hf_trainer.py --data OUT --model DIR --steps 2

The Trainer's loss is the mean over kept tokens; ``--normalize response`` switches to the ProFit
paper's division by all response tokens through
:class:`profit_prep.training.losses.ProFitLossMixin`.
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="profit-prep output directory")
    parser.add_argument("--model", required=True, help="model folder (or hub name)")
    parser.add_argument("--out", default="runs/hf", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tau", type=float, default=None, help="re-threshold at load time")
    parser.add_argument("--normalize", choices=("kept", "response"), default="kept")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from profit_prep.training.collate import PadCollator
    from profit_prep.training.loader import load
    from profit_prep.training.losses import ProFitLossMixin

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load(args.data, tau=args.tau, tokenizer=tokenizer, labels=True,
                   max_length=args.max_length, response_mask=args.normalize == "response")
    cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        bf16=not cpu, use_cpu=cpu,
        remove_unused_columns=False,  # the collator reads completion/response masks itself
    )

    class ProFitTrainer(ProFitLossMixin, Trainer):
        profit_normalize = args.normalize

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = ProFitTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model), args=training_args,
        train_dataset=dataset.remove_columns(["example_id"]),
        # padding comes from row lengths: with pad == eos, DataCollatorForLanguageModeling
        # would drop every end-of-turn token from training
        data_collator=PadCollator(pad_token_id=pad),
    )
    result = trainer.train()
    print(f"steps={trainer.state.global_step} loss={result.training_loss:.4f}")
    return {"steps": trainer.state.global_step, "loss": result.training_loss}


if __name__ == "__main__":
    main()
