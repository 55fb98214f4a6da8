"""The Scorer contract: the reference model's log-probability of every actual token.

``logprobs[t] = log p(input_ids[t] | input_ids[:t])``; position 0 has no context and is NaN.

A scorer is anything with ``score(sequences) -> list[np.ndarray]`` and ``describe()``, plus the
backend's own set-up as class methods (:class:`Scorer`; defaults in :class:`ScorerSetup`):
executors build and set up a backend through this module and nothing else. The backends:
:mod:`profit_prep.scorers.transformers_model` (the correctness oracle),
:mod:`profit_prep.scorers.vllm_engine`, :mod:`profit_prep.scorers.vllm_server`, and
:class:`NullScorer` here (benchmarks: no model).

With ``signals`` (any of :data:`SIGNALS`), a scorer also gives per-token signals of the
distribution that predicted token t: ``entropy`` (nats), ``top1_id``/``top1_logprob`` (the most
likely token and its log-probability) and ``rank`` (1 + the number of tokens with a strictly
larger logit than the gold one). Position 0 holds NaN (floats) or -1 (ints).
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

    @classmethod
    def engine_gpus(cls, tensor_parallel_size: int) -> int:
        """GPUs one engine (one scoring worker) of this backend holds on a GPU node."""
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

    @classmethod
    def engine_gpus(cls, tensor_parallel_size: int) -> int:
        return 1


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
    (``engine_gpus``, ``worker_env``): a benchmark of the pipeline then measures what a vLLM
    run's actors start with.
    """

    @classmethod
    def worker_env(cls, use_gpu: bool) -> dict[str, str]:
        from profit_prep.scorers.vllm_engine import VLLMScorer

        return VLLMScorer.worker_env(use_gpu)

    @classmethod
    def env_names(cls) -> list[str]:
        from profit_prep.scorers.vllm_engine import VLLMScorer

        return VLLMScorer.env_names()

    @classmethod
    def engine_gpus(cls, tensor_parallel_size: int) -> int:
        return tensor_parallel_size

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


# Names that lived here until the transformers scorer got its own module (0.3): importable from
# here for one release, with a DeprecationWarning.
_MOVED_TO_TRANSFORMERS_MODEL = ("TransformersScorer", "length_batches", "is_out_of_memory")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_TRANSFORMERS_MODEL:
        from profit_prep.moved import forward_names

        return forward_names(__name__, __name__, "profit_prep.scorers.transformers_model", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
