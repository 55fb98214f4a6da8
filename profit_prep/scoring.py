"""Teacher-forced scoring: the reference model's log-probability of every actual token.

``logprobs[t] = log p(input_ids[t] | input_ids[:t])``; position 0 has no context and is NaN.

A scorer is anything with ``score(sequences) -> list[np.ndarray]`` and ``describe()``; the
transformers backend here is also the correctness oracle for the vLLM backend
(:mod:`profit_prep.vllm_backend`).

The transformers backend never materialises full-vocabulary logits for a whole batch: it runs
the decoder once (with no KV cache: scoring never reads one back), then applies the LM head to a
bounded number of positions at a time and takes ``logit[gold] - logsumexp(logits)`` chunk by
chunk; an 8,000-token SmolLM2 row peaks ~300 MB above the loaded model (benchmarks/). On GPUs,
sequences are sorted by length and batched under a token budget, so padding costs little; on CPU
one row per forward measured fastest (benchmarks/), so that is the CPU default.

With ``signals`` (any of :data:`SIGNALS`), the same LM-head chunks also give per-token signals
of the distribution that predicted token t, from the full fp32 logits: ``entropy`` (exact, nats),
``top1_id``/``top1_logprob`` (the most likely token and its log-probability) and ``rank`` (1 +
the number of tokens with a strictly larger logit than the gold one). Position 0 holds NaN (floats)
or -1 (ints). :meth:`TransformersScorer.score_with_signals` returns them; ``score`` is unchanged.

Example:
    >>> scorer = TransformersScorer("path/to/model")  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
    >>> lp[0]  # doctest: +SKIP
    nan
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from profit_prep.errors import InputError

SIGNALS = ("entropy", "top1", "rank")
# Stored columns per requested signal, with their numpy dtype; t = 0 holds NaN or -1.
SIGNAL_COLUMNS: dict[str, dict[str, type]] = {
    "entropy": {"entropy": np.float32},
    "top1": {"top1_id": np.int32, "top1_logprob": np.float32},
    "rank": {"rank": np.int32},
}


def parse_signals(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"entropy,top1"`` -> ``("entropy", "top1")`` in :data:`SIGNALS` order; validates names.

    >>> parse_signals("rank, entropy")
    ('entropy', 'rank')
    """
    if not text:
        return ()
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise InputError(f"unknown signal {unknown[0]!r} (choose from {', '.join(SIGNALS)})")
    return tuple(n for n in SIGNALS if n in names)


def signal_columns(signals: Sequence[str]) -> list[str]:
    """The stored column names for the requested signals."""
    return [c for s in signals for c in SIGNAL_COLUMNS[s]]


class Scorer(Protocol):
    """What every backend implements."""

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float32 log-probabilities, one array per sequence, NaN at position 0."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend name and settings, recorded in the manifest."""
        ...

    def close(self) -> None: ...


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


class TransformersScorer:
    """Scores with a Hugging Face causal LM through transformers (CPU or GPU)."""

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


# How the top-k backends (vLLM, servers) estimate entropy; recorded in the manifest's scorer.
TOP_K_ENTROPY = (
    "top-k lower bound: -sum_topk p log p - R log min(R, p_k), R = 1 - sum_topk p (each unseen "
    "token has p <= min(R, p_k)); never above the exact entropy"
)


def parse_top_k_signals(
    signals: str | Sequence[str] | None, top_k: int
) -> tuple[str, ...]:
    """:func:`parse_signals` for the top-k backends (vLLM, servers), with ``top_k`` checked."""
    parsed = parse_signals(signals)
    if parsed and top_k < 1:
        raise InputError(f"--signals-top-k {top_k}: must be at least 1")
    return parsed


def describe_top_k_signals(signals: Sequence[str], top_k: int) -> dict[str, Any]:
    """What a top-k backend's manifest ``scorer`` records about its signals (nothing if none)."""
    if not signals:
        return {}
    return {"signals": list(signals), "signals_top_k": top_k, "entropy_estimator": TOP_K_ENTROPY}


def top_k_entropy(top_logprobs: np.ndarray) -> np.ndarray:
    """Entropy (nats) estimated from each row's top-k log-probabilities: a lower bound.

    The k known tokens contribute exactly; the unseen tail has mass ``R = 1 - sum p`` and each
    of its tokens has ``p <= min(R, p_k)`` (``p_k`` the smallest known one), so its share is at
    least ``-R log min(R, p_k)``. Of the estimators measured on SmolLM2 (renormalised top-k,
    tail as one token, tail spread uniformly, this one) it has the smallest error
    (benchmarks/signals_error.py; docs/format.md has the figures).

    >>> lp = np.log(np.array([[0.5, 0.25, 0.25]]))  # the whole distribution: exact
    >>> round(float(top_k_entropy(lp)[0]), 6) == round(float(np.log(2) * 1.5), 6)
    True
    >>> # tail R = 0.2, bound min(0.2, 0.3): exact if the tail is one token, as in [.5, .3, .2]
    >>> round(float(top_k_entropy(np.log(np.array([[0.5, 0.3]])))[0]), 4)
    1.0297
    """
    lp = np.asarray(top_logprobs, dtype=np.float64)
    p = np.exp(lp)
    head = -(p * lp).sum(-1)
    tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    bound = np.minimum(tail, p.min(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(tail > 0, -tail * np.log(bound), 0.0)
    return head + rest


def top_k_signals(
    token_ids: Sequence[int],
    entries: Sequence[Mapping[int, tuple[float, int | None]] | None],
    k: int,
    signals: Sequence[str],
) -> dict[str, np.ndarray]:
    """``logprobs`` and signal columns from per-position top-k log-probabilities.

    ``entries[t]`` maps token id -> ``(logprob, rank)`` for the distribution that predicted
    token t: the k most likely tokens plus the actual one, as vLLM returns them (the actual
    token's rank counts every token with a logprob >= its own; ``entries[0]`` is empty). Exact:
    ``logprobs``, ``top1_id``/``top1_logprob`` (ties: the lowest id, as ``argmax``) and
    ``rank`` (``1 +`` tokens strictly more likely; ties seen in the top-k share the best rank, as
    in :class:`TransformersScorer`). ``entropy`` is :func:`top_k_entropy` of the top k.

    >>> top = {5: (-0.2, 1), 9: (-2.0, 2)}
    >>> cols = top_k_signals([1, 9], [None, {**top, 7: (-3.0, 4)}], 2, ("top1", "rank"))
    >>> int(cols["top1_id"][1]), int(cols["rank"][1]), float(cols["logprobs"][1])
    (5, 2, -2.0)
    """
    n = len(token_ids)
    if len(entries) != n:
        raise RuntimeError(f"got {len(entries)} prompt logprobs for {n} tokens")
    m = max(n - 1, 0)
    logprobs = np.empty(m, np.float64)
    top = np.full((m, k), -np.inf)
    top1_id = np.empty(m, np.int32)
    rank = np.empty(m, np.int32)
    for t in range(1, n):
        entry = entries[t] or {}
        gold = int(token_ids[t])
        if gold not in entry:
            raise RuntimeError(f"prompt logprobs lack the actual token {gold} at position {t}")
        gold_lp, gold_rank = entry[gold]
        # Sort by logprob, ties by id: the first k are the top k (the actual token can be an
        # extra (k+1)-th entry), and the first is argmax's choice.
        ranked = sorted(entry.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        values = [v[0] for _, v in ranked]
        top[t - 1, : len(values)] = values
        logprobs[t - 1] = gold_lp
        top1_id[t - 1] = ranked[0][0]
        above = sum(v > gold_lp for v in values)
        if len(entry) <= k:  # the actual token is one of the top k: all better ones are seen
            rank[t - 1] = 1 + above
        else:  # vLLM counted logprob >= gold's; take the ties we can see back out
            if gold_rank is None:
                raise RuntimeError(f"prompt logprobs lack the actual token's rank at {t}")
            ties = sum(v == gold_lp for tid, (v, _) in entry.items() if tid != gold)
            rank[t - 1] = max(1 + above, gold_rank - ties)
    cols: dict[str, np.ndarray] = {"logprobs": logprobs.astype(np.float32)}
    if "entropy" in signals:
        cols["entropy"] = top_k_entropy(top).astype(np.float32)
    if "top1" in signals:
        cols["top1_id"], cols["top1_logprob"] = top1_id, top[:, 0].astype(np.float32)
    if "rank" in signals:
        cols["rank"] = rank
    out = {}
    for name, values in cols.items():  # position 0 has no context: NaN or -1
        first = np.array([-1 if values.dtype == np.int32 else np.nan], values.dtype)
        out[name] = np.concatenate([first, values])[:n]
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation failure (which torch reports as a RuntimeError)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
