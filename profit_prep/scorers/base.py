"""Teacher-forced scoring: the reference model's log-probability of every actual token.

``logprobs[t] = log p(input_ids[t] | input_ids[:t])``; position 0 has no context and is NaN.

A scorer is anything with ``score(sequences) -> list[np.ndarray]`` and ``describe()``; the
transformers backend here is also the correctness oracle for the vLLM backend
(:mod:`profit_prep.scorers.vllm_engine`).

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

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from profit_prep.errors import InputError

if TYPE_CHECKING:
    from profit_prep.config import ScoreConfig

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
    """The one contract every backend implements (:func:`profit_prep.scorers.choose.make_scorer`
    returns one; the executors use nothing else).

    ``signals`` are parsed and checked once, when the scorer is built. The class methods are
    the backend's own set-up, asked before (or instead of) building a scorer: executors call
    them and never name a backend (:class:`ScorerSetup` has the defaults).
    """

    signals: tuple[str, ...]

    @classmethod
    def preflight(cls, config: ScoreConfig, model_dir: Path, tokenizer: Any,
                  started: dict[str, Any]) -> Preflight:
        """Check the reference model before the run; the manifest's ``model`` record."""
        ...

    @classmethod
    def check_importable(cls) -> None:
        """Refuse, with one line, a backend whose packages this machine lacks."""
        ...

    @classmethod
    def worker_env(cls, use_gpu: bool) -> dict[str, str]:
        """Environment variables a scoring worker process (a Ray actor) starts with."""
        ...

    @classmethod
    def env_names(cls) -> list[str]:
        """Names of this process's variables that configure the backend (recorded per actor;
        names only, since a value may be a credential)."""
        ...

    @classmethod
    def bind_worker(cls, threads: int) -> Any:
        """Give this worker process ``threads`` CPUs of its node; a handle to hold, if any."""
        ...

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Float32 log-probabilities, one array per sequence, NaN at position 0."""
        ...

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sequence: ``logprobs`` plus the columns of ``signals`` (same shape, t = 0 empty)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend name and settings, recorded in the manifest."""
        ...

    def close(self) -> None: ...


@dataclass
class Preflight:
    """What a backend checked before the run: the manifest's ``model`` record (its
    ``content_hash`` identifies the model), the probe a server run stores in run.json, and the
    scorer built to check, if any, which the in-process executor uses instead of a second."""

    model: dict[str, Any]
    probe: dict[str, Any] | None = None
    scorer: Scorer | None = None


class ScorerSetup:
    """The contract's set-up defaults, for a backend that loads local weights with torch."""

    @classmethod
    def preflight(cls, config: ScoreConfig, model_dir: Path, tokenizer: Any,
                  started: dict[str, Any]) -> Preflight:
        """Weights complete, vocabulary fits the tokenizer; the model's content hash."""
        from profit_prep.scorers.models import check_weights, model_content_hash

        check_weights(model_dir)
        check_vocab(model_dir, tokenizer)
        note = None if config.quiet else (lambda line: print(line, file=sys.stderr))
        model_hash = model_content_hash(model_dir, note=note)
        return Preflight({"name": config.model, "path": str(model_dir),
                          "content_hash": model_hash})

    @classmethod
    def check_importable(cls) -> None:
        pass

    @classmethod
    def worker_env(cls, use_gpu: bool) -> dict[str, str]:
        return {}

    @classmethod
    def env_names(cls) -> list[str]:
        return []

    @classmethod
    def bind_worker(cls, threads: int) -> Any:
        bind_threads(threads)
        return None


def check_vocab(model_dir: Path, tokenizer: Any) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab and len(tokenizer) > vocab:
        raise InputError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}: "
            "they do not belong together"
        )


class NullScorer(ScorerSetup):
    """For benchmarks and tests only: every token gets log-probability 0 (p = 1), instantly, in
    the shapes and dtypes every backend returns, so the pipeline's own cost (read, render, mask,
    write, Ray's hand-offs) can be measured without a model (``--backend null``).

    Its Ray actors are placed and get the environment as vLLM's would
    (:func:`profit_prep.executors.placement.gpus_per_worker`): a benchmark of the pipeline then
    measures what a vLLM run's actors start with.
    """

    @classmethod
    def worker_env(cls, use_gpu: bool) -> dict[str, str]:
        from profit_prep.scorers.vllm_engine import VLLMScorer

        return VLLMScorer.worker_env(use_gpu)

    @classmethod
    def env_names(cls) -> list[str]:
        from profit_prep.scorers.vllm_engine import VLLMScorer

        return VLLMScorer.env_names()

    def __init__(self, signals: str | Sequence[str] | None = None) -> None:
        self.signals = parse_signals(signals)

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for seq in sequences:
            lp = np.zeros(len(seq), np.float32)
            lp[:1] = np.nan
            out.append(lp)
        return out

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        result = []
        for seq, lp in zip(sequences, self.score(sequences), strict=True):
            cols: dict[str, np.ndarray] = {"logprobs": lp}
            if "entropy" in self.signals:
                cols["entropy"] = np.where(np.isnan(lp), np.nan, 0).astype(np.float32)
            if "top1" in self.signals:  # p = 1: the actual token is the top-1
                cols["top1_id"] = np.r_[-1, np.asarray(seq[1:])].astype(np.int32)
                cols["top1_logprob"] = lp.copy()
            if "rank" in self.signals:
                cols["rank"] = np.r_[-1, np.ones(max(len(seq) - 1, 0))].astype(np.int32)[
                    : len(seq)]
            result.append(cols)
        return result

    def describe(self) -> dict[str, Any]:
        return {"backend": "null", "note": "benchmarks only: every logprob is 0"}

    def close(self) -> None:
        pass


def bind_threads(threads: int) -> None:
    """The transformers backend's share of a machine: torch's intra-op threads."""
    import torch

    torch.set_num_threads(threads)


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
