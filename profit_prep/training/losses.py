"""ProFit losses: the masked next-token loss with the paper's or the trainers' normalisation.

With kept tokens K (ProFit mask) and response tokens R (before masking)::

    normalize="kept"      loss = sum_{t in K} w_t * nll_t / |K|    (TRL, HF Trainer, -100 labels)
    normalize="response"  loss = sum_{t in K} w_t * nll_t / |R|    (the ProFit paper's code)

``w_t = 1`` unless per-token weights are given (``load(weights="prob")``: DFT-style p). With
gradient accumulation the denominator must count the whole accumulated batch: pass it as
``num_items_in_batch``. :class:`ProFitLossMixin` does all of this inside an HF ``Trainer`` or a
TRL ``SFTTrainer``; :func:`profit_loss` alone fits ``Trainer(compute_loss_func=...)`` for the
``kept`` normalisation (that hook sees only outputs and labels, not the response mask).

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4)
    >>> labels = torch.tensor([[-100, 1, -100]])
    >>> response = torch.tensor([[0, 1, 1]])
    >>> round(profit_loss(logits, labels).item(), 4)  # log(4)
    1.3863
    >>> round(profit_loss(logits, labels, response, normalize="response").item(), 4)
    0.6931
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NORMALIZE = ("kept", "response")


def profit_loss(
    logits: Any,
    labels: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    normalize: str = "kept",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked causal-LM loss; ``logits`` may be a tensor or a model output with ``.logits``.

    ``labels`` hold -100 where a token is not trained; ``num_items_in_batch``, when given,
    replaces the denominator (kept or response tokens over the accumulated batch).

    Example:
        >>> trainer = Trainer(model, args, compute_loss_func=profit_loss)  # doctest: +SKIP
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    logits = logits.logits if hasattr(logits, "logits") else logits
    # logits at t-1 predict the token at t
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none",
    )
    if weights is not None:
        # weights are constants (like DFT's detached p); zero outside the labels anyway
        nll = nll * weights[..., 1:].reshape(-1).to(nll).detach()
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=nll.device)
    elif normalize == "response":
        if response_mask is None:
            raise ValueError('normalize="response" needs response_mask (load(response_mask=True))')
        denominator = response_mask[..., 1:].sum()
    else:
        denominator = (shift_labels != -100).sum()
    # clamp: a batch with nothing to train on gives 0, not 0/0
    return nll.sum() / denominator.to(nll.device, nll.dtype).clamp(min=1)


def weighted_profit_loss(
    logits: Any,
    labels: torch.Tensor,
    weights: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    normalize: str = "kept",
) -> torch.Tensor:
    """:func:`profit_loss` with per-token weights (e.g. ``load(weights="prob")``).

    Example:
        >>> out = model(input_ids=batch["input_ids"])  # doctest: +SKIP
        >>> loss = weighted_profit_loss(out, batch["labels"], batch["weights"])  # doctest: +SKIP
    """
    return profit_loss(logits, labels, response_mask, num_items_in_batch, normalize, weights)


class ProFitLossMixin:
    """Put before ``Trainer``/``SFTTrainer`` in the bases: ProFit loss with either normalisation.

    Needs batches from :class:`profit_prep.training.collate.PadCollator` (or ``PackedCollator``)
    with
    ``labels``, plus ``response_mask`` for ``normalize="response"`` and ``weights`` if wanted,
    and ``remove_unused_columns=False`` so those columns reach the collator.

    Example:
        >>> class ProFitSFTTrainer(ProFitLossMixin, SFTTrainer):  # doctest: +SKIP
        ...     profit_normalize = "response"
    """

    profit_normalize: str = "kept"

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list[Any], Any]:
        # The Trainer counts kept labels over the accumulated batches; the paper counts responses
        batches, num_items = super().get_batch_samples(*args, **kwargs)  # type: ignore[misc]
        if (
            self.profit_normalize == "response"
            and num_items is not None
            and batches
            and "response_mask" in batches[0]
        ):
            count = sum(b["response_mask"][..., 1:].sum() for b in batches)
            count = count.to(self.args.device)  # type: ignore[attr-defined]
            if self.args.average_tokens_across_devices and self.args.world_size > 1:  # type: ignore[attr-defined]
                count = self.accelerator.gather(count).sum()  # type: ignore[attr-defined]
            num_items = count
        return batches, num_items

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        response_mask = inputs.pop("response_mask", None)
        weights = inputs.pop("weights", None)
        outputs = model(**inputs, use_cache=False)
        loss = profit_loss(
            outputs, labels, response_mask, num_items_in_batch, self.profit_normalize, weights
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:  # type: ignore[attr-defined]
            # like Trainer.compute_loss: DDP averages gradients over ranks, the count is global
            loss = loss * self.accelerator.num_processes  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss
