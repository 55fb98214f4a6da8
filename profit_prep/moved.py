"""Import paths that moved in 0.3, when the package was split into folders (docs/layout.md).

Every old path keeps importing, with a ``DeprecationWarning``, for one release: ``import
profit_prep.output`` gives the very module object ``profit_prep.store.writer`` (so patching one
patches the other). ``profit_prep.rules`` and ``profit_prep.rendering`` are folders now; their
``__init__`` forwards the old modules' names the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

# old path under profit_prep -> new path under profit_prep
MOVED_MODULES: dict[str, str] = {
    "reading": "inputs.formats",
    "sources": "inputs.sources",
    "json_array": "inputs.json_array",
    "input_checks": "inputs.checks",
    "duplicate_ids": "inputs.duplicate_ids",
    "preflight": "inputs.preflight",
    "protected_tokenization": "rendering.protected",
    "tokenizer_identity": "rendering.tokenizer",
    "scoring": "scorers.base",
    "backends": "scorers.choose",
    "top_k": "scorers.top_k",
    "vllm_backend": "scorers.vllm_engine",
    "server_backend": "scorers.vllm_server",
    "server_answers": "scorers.server_answers",
    "server_probe": "scorers.server_probe",
    "gpu": "scorers.gpu",
    "sizing": "scorers.sizing",
    "models": "scorers.models",
    "pipeline": "job",
    "driver": "executors.local",
    "ray_pipeline": "executors.ray",
    "placement": "executors.placement",
    "format": "store.schema",
    "output": "store.writer",
    "output_check": "store.reader",
    "output_names": "store.names",
    "shard_counts": "store.shard_counts",
    "safe_files": "store.safe_files",
    "combine": "store.combine",
    "masks": "rules.profit",
    "loading": "training.loader",
    "collate": "training.collate",
    "losses": "training.losses",
    "exports": "training.exports",
    "exports.check": "training.exports.check",
    "exports.driver": "training.exports.driver",
    "exports.swift": "training.exports.swift",
    "exports.writers": "training.exports.writers",
}


def warn_moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=3)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (the same object)."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("profit_prep."):
            return None
        if fullname.removeprefix("profit_prep.") not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = "profit_prep." + MOVED_MODULES[spec.name.removeprefix("profit_prep.")]
        warn_moved(spec.name, new)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already loaded."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), ahead of the file-system finder."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


def forward_names(package: str, old_module: str, new_module: str, name: str) -> object:
    """A package ``__getattr__`` body: ``profit_prep.rules.Select`` from the old ``rules.py``."""
    module = importlib.import_module(new_module)
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warn_moved(f"{old_module}.{name}", f"{new_module}.{name}")
    return getattr(module, name)
