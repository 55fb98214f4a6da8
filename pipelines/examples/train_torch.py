"""A plain PyTorch loop on ProFit masks, with profit-prep's collator and loss.

    python pipelines/examples/train_torch.py --data OUT --model DIR --steps 2
    python pipelines/examples/train_torch.py --data OUT --model DIR --packed --weights prob
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="profit-prep output directory")
    parser.add_argument("--model", required=True, help="model folder (or hub name)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--tau", type=float, default=None, help="re-threshold at load time")
    parser.add_argument("--normalize", choices=("kept", "response"), default="kept")
    parser.add_argument("--weights", choices=("prob",), default=None, help="DFT-style weights")
    parser.add_argument("--packed", action="store_true", help="padding-free batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profit_prep.training.collate import PackedCollator, PadCollator
    from profit_prep.training.loader import load
    from profit_prep.training.losses import profit_loss

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load(args.data, tau=args.tau, tokenizer=tokenizer, max_length=args.max_length,
                   weights=args.weights, response_mask=args.normalize == "response")
    dataset = dataset.remove_columns(["example_id"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = PackedCollator() if args.packed else PadCollator(pad_token_id=pad)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    # sdpa/eager read packed row boundaries from position_ids
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    step, losses = 0, []
    while step < args.steps:
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels = batch.pop("labels")
            response = batch.pop("response_mask", None)
            weights = batch.pop("weights", None)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                      if k in batch}
            # use_cache=False: with a cache, packed rows would attend across their boundaries
            outputs = model(**inputs, use_cache=False)
            loss = profit_loss(outputs, labels, response, normalize=args.normalize, weights=weights)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            print(f"step {step} loss {losses[-1]:.4f}")
            if step >= args.steps:
                break
    return {"steps": step, "loss": sum(losses) / len(losses)}


if __name__ == "__main__":
    main()
