"""The one place that asks "is there a GPU?", and what follows from the answer (the dtype).

Asked before vLLM starts its engine, the question must not initialise the CUDA runtime: vLLM
forks its engine process unless CUDA is already *initialised* in torch's sense
(``vllm/utils/system_utils.py::_maybe_force_spawn``), and torch's default
``torch.cuda.is_available()`` calls ``cudaGetDeviceCount`` (``cuInit``), which marks the process
fork-unsafe without setting that flag: the forked engine then dies with "Cannot re-initialize
CUDA in forked subprocess". With ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` torch answers from NVML
instead (``torch/cuda/__init__.py::is_available``), which is fork-safe. :func:`cuda_available`
sets it for the whole process (vLLM's own later questions benefit too) before asking; the
compute capability comes from NVML as well (:func:`compute_capability`).

Example:
    >>> resolve_dtype("auto", "cpu")
    ('float32', 'auto: float32 on CPU (the safe CPU default; bf16 is slower without AVX512-BF16)')
    >>> resolve_dtype("auto", "cuda", (9, 0))[0], resolve_dtype("auto", "cuda", (7, 5))[0]
    ('bfloat16', 'float16')
"""

from __future__ import annotations

import os
from typing import Any

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
# The dtype choices, declared once: argparse (ScoreConfig's field metadata), the Python API
# (check_dtype) and the backends read them from here.
DTYPES = ("auto", "float32", "bfloat16", "float16")
# bfloat16 arithmetic needs compute capability 8.0 (Ampere) or newer.
BF16_CAPABILITY = (8, 0)


def check_dtype(dtype: str) -> None:
    """Refuse an unknown dtype with one line (the CLI, config files and the Python API)."""
    from profit_prep.errors import InputError

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose {', '.join(DTYPES)}")


def use_nvml_check() -> None:
    """Make torch answer CUDA questions from NVML in this process (and its children)."""
    os.environ[NVML_CHECK] = "1"


def cuda_available() -> bool:
    """Whether this process sees a CUDA GPU, asked without initialising CUDA (NVML).

    If NVML itself cannot be read, torch falls back to the runtime check (a broken NVML is rare
    and out of our hands); a CPU-only torch answers False without asking anything.
    """
    use_nvml_check()
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch means no CUDA for our purposes
        return False


def cuda_device_count() -> int:
    """GPUs this process sees (NVML, honouring CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def _nvml() -> Any:
    """The pynvml module (nvidia-ml-py, or vLLM's copy of it), initialised; None without one."""
    for name in ("pynvml", "vllm.third_party.pynvml"):
        try:
            module = __import__(name, fromlist=["nvmlInit"])
            module.nvmlInit()
            return module
        except Exception:  # noqa: BLE001 - not installed, or no driver: try the next
            continue
    return None


def _nvml_handle(nvml: Any, index: int) -> Any:
    """NVML's handle of visible device ``index`` (NVML numbers physical devices)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(index)


def compute_capability(index: int = 0) -> tuple[int, int] | None:
    """Visible GPU ``index``'s compute capability from NVML (no CUDA context); None if unknown."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(_nvml_handle(nvml, index))
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - unknown: the caller says so
        return None


def gpu_info(index: int = 0) -> dict[str, Any] | None:
    """Name, total memory and compute capability of visible GPU ``index`` (NVML), or None."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = _nvml_handle(nvml, index)
        name = nvml.nvmlDeviceGetName(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return {"name": name.decode() if isinstance(name, bytes) else str(name),
                "total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - unknown
        return None


def resolve_dtype(
    dtype: str, device: str, capability: tuple[int, int] | None = None
) -> tuple[str, str]:
    """The dtype to load the reference in, and why (for the first output lines and manifest).

    ``auto``: bfloat16 on a CUDA GPU that has it (compute capability 8.0+), float16 on older
    ones, float32 on CPU. An unknown capability on CUDA means bfloat16 (every data-centre GPU
    since 2020 has it; pass --dtype float16 on a V100 or T4).
    """
    check_dtype(dtype)
    if dtype != "auto":
        return dtype, "--dtype"
    if device != "cuda":
        return "float32", ("auto: float32 on CPU (the safe CPU default; bf16 is slower without "
                           "AVX512-BF16)")
    if capability is None:
        return "bfloat16", ("auto: bfloat16 on CUDA (compute capability not readable through "
                            "NVML; on a GPU older than Ampere pass --dtype float16)")
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) >= BF16_CAPABILITY:
        return "bfloat16", f"auto: bfloat16 on CUDA (compute capability {cc} has bf16)"
    return "float16", f"auto: float16 on CUDA (compute capability {cc} has no bf16)"
