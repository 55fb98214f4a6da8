"""Train with TRL's SFTTrainer on ProFit masks from a scored output.

    python pipelines/examples/train_trl.py --data OUT --model DIR --steps 2
    python pipelines/examples/train_trl.py --data OUT --model DIR --tau 0.3 --normalize response

``--normalize kept`` (default) is TRL's own loss: pre-tokenized ``completion_mask`` rows are
turned into -100 labels, which TRL applies only with ``completion_only_loss=True``.
``--normalize response`` divides by all response tokens, as the ProFit paper does: that needs
the response mask in every batch, so it uses profit-prep's collator and loss mixin.
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="profit-prep output directory")
    parser.add_argument("--model", required=True, help="model folder (or hub name)")
    parser.add_argument("--out", default="runs/trl", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tau", type=float, default=None, help="re-threshold at load time")
    parser.add_argument("--normalize", choices=("kept", "response"), default="kept")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from profit_prep.training.collate import PadCollator
    from profit_prep.training.loader import load
    from profit_prep.training.losses import ProFitLossMixin

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    response = args.normalize == "response"
    # Truncate here, not in TRL: TRL would cut input_ids/labels but not the response mask
    dataset = load(args.data, tau=args.tau, tokenizer=tokenizer, max_length=args.max_length,
                   labels=response, response_mask=response)
    cpu = not torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        max_length=args.max_length,
        completion_only_loss=True,  # without it TRL silently ignores completion_mask
        bf16=not cpu, gradient_checkpointing=not cpu,  # the CPU defaults are ~16x slower
        use_cpu=cpu,
        # kept: TRL drops example_id itself; response: the collator needs response_mask
        remove_unused_columns=not response,
        dataset_kwargs={"skip_prepare_dataset": True} if response else None,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if response:
        class ProFitSFTTrainer(ProFitLossMixin, SFTTrainer):
            profit_normalize = "response"

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainer: SFTTrainer = ProFitSFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            data_collator=PadCollator(pad_token_id=pad))
    else:
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    result = trainer.train()
    print(f"steps={trainer.state.global_step} loss={result.training_loss:.4f}")
    return {"steps": trainer.state.global_step, "loss": result.training_loss}


if __name__ == "__main__":
    main()
