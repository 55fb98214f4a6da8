"""Model folders: the full content hash (cached by file identity) and the weights check."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from profit_prep.errors import InputError
from profit_prep.scorers.models import check_weights, file_sha256, model_content_hash
from tests.conftest import DEMO_GSM8K, assert_one_error_line


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def perturb_middle_tensor(weights: Path) -> str:
    """Change one byte of the tensor lying in the middle of a safetensors file, keeping its
    size and its mtime: the name of the tensor changed."""
    data = weights.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    middle = len(data) // 2
    name, info = next((k, v) for k, v in header.items() if k != "__metadata__"
                      and 8 + length + v["data_offsets"][0] <= middle
                      < 8 + length + v["data_offsets"][1])
    st = weights.stat()
    with weights.open("r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert weights.stat().st_size == st.st_size
    return name


def test_same_size_weights_changed_in_the_middle_change_the_hash(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "m")
    cache = tmp_path / "cache"
    before = model_content_hash(model, cache)
    assert before.startswith("sha256-files:") and before == model_content_hash(model, cache)
    size = (model / "model.safetensors").stat().st_size
    assert size > 8 << 20, "the tensor changed must lie outside the first and last 4 MiB"
    perturb_middle_tensor(model / "model.safetensors")
    after = model_content_hash(model, cache)
    assert after != before
    assert after == model_content_hash(model, tmp_path / "fresh-cache")  # not a stale entry


def test_the_hash_is_read_once_then_found_by_file_identity(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    model = copy_model(tiny_model_dir, tmp_path / "m")
    cache = tmp_path / "cache"
    weights = model / "model.safetensors"
    first = file_sha256(weights, cache)
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, algo: reads.append(1) or real(f, algo))
    assert file_sha256(weights, cache) == first and reads == []  # a stat, no read
    os.utime(weights)  # any write changes the identity (here only the times): read again
    assert file_sha256(weights, cache) == first and reads == [1]
    # A moved copy is another file: read again, same content, same hash.
    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, moved)
    assert file_sha256(moved, cache) == first and reads == [1, 1]


def test_an_unwritable_cache_only_costs_a_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    assert model_content_hash(tiny_model_dir, blocker / "cache") == model_content_hash(
        tiny_model_dir, tmp_path / "c")


def truncate(path: Path, keep: int) -> None:
    with path.open("r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_weights", "no weights (no *.safetensors or *.bin file"),
        ("cut_tail", "model.safetensors is truncated: its header describes"),
        ("cut_to_header", "model.safetensors is truncated: its header alone is"),
        ("cut_to_4_bytes", "model.safetensors is truncated (4 bytes"),
        ("garbage_header", "model.safetensors is not a safetensors file"),
        ("index_names_missing", "names model-00002-of-00002.safetensors, which is missing"),
        ("bin_cut", "pytorch_model.bin is truncated or damaged"),
    ],
)
def test_missing_or_truncated_weights_are_one_accurate_line(
    tiny_model_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    if damage == "no_weights":  # a trainer's state is not weights
        weights.unlink()
        for name in ("optimizer.pt", "training_args.bin", "rng_state_0.pth"):
            (model / name).write_bytes(b"state")
    elif damage == "cut_tail":
        truncate(weights, size - 1)
    elif damage == "cut_to_header":
        truncate(weights, 100)
    elif damage == "cut_to_4_bytes":
        truncate(weights, 4)
    elif damage == "garbage_header":
        weights.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 100)
    elif damage == "index_names_missing":
        weights.rename(model / "model-00001-of-00002.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif damage == "bin_cut":
        import torch

        weights.unlink()
        torch.save({"w": torch.zeros(50_000)}, model / "pytorch_model.bin")
        assert zipfile.is_zipfile(model / "pytorch_model.bin")
        check_weights(model)  # whole: fine
        truncate(model / "pytorch_model.bin", (model / "pytorch_model.bin").stat().st_size // 2)
    with pytest.raises(InputError) as caught:
        check_weights(model)
    assert str(caught.value).startswith(f"model {model}: ") and message in str(caught.value)


def test_whole_weights_pass_the_check(tiny_model_dir: Path, smollm2_dir: Path) -> None:
    check_weights(tiny_model_dir)
    check_weights(smollm2_dir)


def test_cli_with_truncated_weights_is_one_error_line_before_scoring(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "m")
    truncate(model / "model.safetensors", (model / "model.safetensors").stat().st_size - 4096)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "profit_prep.cli", "score", "--model", str(model), "--data",
         str(DEMO_GSM8K), "--out", str(out), "--prompt-field", "question", "--response-field",
         "answer", "--limit", "2"], capture_output=True, text=True, timeout=600)
    assert_one_error_line(result, "model.safetensors is truncated: its header describes")
    assert not out.exists()
