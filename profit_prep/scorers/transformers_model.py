"""The transformers scoring backend: a Hugging Face causal LM, on CPU or GPU; the correctness
oracle for the other backends.

It never materialises full-vocabulary logits for a whole batch: it runs the decoder once (with
no KV cache: scoring never reads one back), then applies the LM head to a bounded number of
positions at a time and takes ``logit[gold] - logsumexp(logits)`` chunk by chunk; an 8,000-token
SmolLM2 row peaks ~300 MB above the loaded model (benchmarks/). On GPUs, sequences are sorted by
length and batched under a token budget, so padding costs little; on CPU one row per forward
measured fastest (benchmarks/), so that is the CPU default.

With ``signals``, the same LM-head chunks give the signal columns from the full fp32 logits
(entropy exact): :meth:`TransformersScorer.score_with_signals` returns them; ``score`` is
unchanged.

Example:
    >>> scorer = TransformersScorer("path/to/model")  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
    >>> lp[0]  # doctest: +SKIP
    nan
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.base import SIGNAL_COLUMNS, ScorerSetup, parse_signals


def length_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (longest x count) fits the token budget.

    Longest first, so the first batch shows the peak memory straight away.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class TransformersScorer(ScorerSetup):
    """Scores with a Hugging Face causal LM through transformers (CPU or GPU)."""

    dtype_reason: str | None = None  # why this dtype (set by backends.make_scorer), for describe()

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_tokens: int | None = None,
        logits_budget_mb: int = 128,
        compile: bool = False,
        num_threads: int | None = None,
        signals: str | Sequence[str] | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if num_threads and self.device == "cpu":
            torch.set_num_threads(num_threads)
        self.dtype = dtype
        self.signals = parse_signals(signals)
        self.model_path = str(model)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=getattr(torch, dtype)
        ).to(self.device)
        self.model.eval()
        self.decoder = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        vocab = self.lm_head.weight.shape[0]
        # Positions per LM-head chunk: fp32 logits of one chunk stay under the budget.
        # Entropy needs a second chunk-sized tensor (the probabilities): halve the chunk then.
        per_position = 4 * vocab * (2 if "entropy" in self.signals else 1)
        self.chunk = max(16, (logits_budget_mb << 20) // per_position)
        # Measured on CPU: padded batches are slower than one row per forward (the GEMMs are
        # already large and padding adds work), so batch only on accelerators.
        if max_batch_tokens is None:
            max_batch_tokens = 1 if self.device == "cpu" else 32768
        self.max_batch_tokens = max_batch_tokens
        self.compiled = compile
        if compile:
            import torch._inductor.config as inductor_config

            # Freezing lets inductor pre-pack weights for oneDNN: ~2x eager GEMM speed on CPU.
            inductor_config.freezing = True
            self.decoder = torch.compile(self.decoder, dynamic=True)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "dtype": self.dtype,
            **({"dtype_reason": self.dtype_reason} if self.dtype_reason else {}),
            "device": self.device,
            "max_batch_tokens": self.max_batch_tokens,
            "compile": self.compiled,
            **({"signals": list(self.signals)} if self.signals else {}),
        }

    def close(self) -> None:
        self.model = self.decoder = self.lm_head = None

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [r["logprobs"] for r in self.score_with_signals(sequences)]

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sequence: ``logprobs`` plus the columns of the scorer's ``signals``.

        Example:
            >>> s = TransformersScorer("model", signals="entropy,rank")  # doctest: +SKIP
            >>> sorted(s.score_with_signals([np.array([1, 2, 3])])[0])  # doctest: +SKIP
            ['entropy', 'logprobs', 'rank']
        """
        import torch

        out: list[dict[str, np.ndarray]] = [{}] * len(sequences)
        lengths = [len(s) for s in sequences]
        with torch.inference_mode():
            for batch in length_batches(lengths, self.max_batch_tokens):
                for i, r in zip(batch, self._score_or_split([sequences[i] for i in batch])):
                    out[i] = r
        return out

    def _score_or_split(self, sequences: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Score a batch; out of memory, split it in half (then shrink LM-head chunks) and retry.

        A run must not die on one oversized batch: it loses hours of GPU work otherwise.
        """
        try:
            return self._score_batch(sequences)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.release_memory()
            if len(sequences) > 1:
                half = len(sequences) // 2
                return self._score_or_split(sequences[:half]) + self._score_or_split(
                    sequences[half:]
                )
            if self.chunk > 16:
                self.chunk //= 2  # stays smaller: the next long row would fail the same way
                return self._score_or_split(sequences)
            raise InputError(
                f"out of memory scoring one row of {len(sequences[0])} tokens on {self.device}; "
                "lower --max-length or use a larger device"
            ) from exc

    def release_memory(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _score_batch(self, sequences: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        import torch

        longest = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        attention = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):  # right padding: real tokens keep positions 0..n-1
            ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
            attention[row, : len(seq)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        # use_cache=False: the config default (True) builds a KV cache of every layer that
        # scoring never reads, ~370 MB on an 8,000-token SmolLM2 row (benchmarks/run.py).
        hidden = self.decoder(
            input_ids=ids, attention_mask=attention, use_cache=False
        ).last_hidden_state
        # Hidden state at t-1 predicts token t: gather the real positions of every row.
        h = torch.cat([hidden[row, : len(seq) - 1] for row, seq in enumerate(sequences)])
        targets = torch.cat([ids[row, 1 : len(seq)] for row, seq in enumerate(sequences)])
        n = len(targets)
        columns = {"logprobs": torch.empty(n, dtype=torch.float32, device=self.device)}
        for sig in self.signals:
            for name, np_type in SIGNAL_COLUMNS[sig].items():
                dtype = torch.int32 if np_type is np.int32 else torch.float32
                columns[name] = torch.empty(n, dtype=dtype, device=self.device)
        for start in range(0, n, self.chunk):
            stop = start + self.chunk
            logits = self.lm_head(h[start:stop]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            gold = logits.gather(1, targets[start:stop, None]).squeeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            columns["logprobs"][start:stop] = gold - lse
            if "entropy" in self.signals:
                # H = -sum p log p = lse - sum p * logit, over the full vocabulary
                probs = torch.exp(logits - lse[:, None])
                columns["entropy"][start:stop] = lse - (probs * logits).sum(-1)
                del probs
            if "top1" in self.signals:
                best, best_id = logits.max(dim=-1)
                columns["top1_id"][start:stop] = best_id.to(torch.int32)
                columns["top1_logprob"][start:stop] = best - lse
            if "rank" in self.signals:
                columns["rank"][start:stop] = 1 + (logits > gold[:, None]).sum(-1).to(torch.int32)
        flat = {k: v.cpu().numpy() for k, v in columns.items()}
        result, offset = [], 0
        for seq in sequences:
            m = len(seq) - 1
            row = {}
            for name, values in flat.items():
                first = np.array([-1 if values.dtype == np.int32 else np.nan], values.dtype)
                row[name] = np.concatenate([first, values[offset : offset + m]])
            result.append(row)
            offset += m
        return result


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure (which torch reports as a RuntimeError)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
