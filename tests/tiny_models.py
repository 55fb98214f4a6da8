"""Tiny Llama models for tests: real computation in milliseconds, SmolLM2's tokenizer.

Their probabilities say nothing about language; use them where the code path, not the model,
is under test. End-to-end tests use the real SmolLM2 (``smollm2_dir`` in conftest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tiny_llama_config(tokenizer_dir: Path):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    vocab = json.loads((tokenizer_dir / "config.json").read_text()).get("vocab_size", 49152)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)


def tiny_random_llama(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer randomly initialised Llama (``torch.manual_seed(seed)``) with the tokenizer and
    vocabulary size of ``tokenizer_dir``: for tests and benchmark smoke runs (its
    probabilities are ~1/vocab everywhere)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(_tiny_llama_config(tokenizer_dir)).save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return folder


def splitmix_normalish(count: int, stream: int) -> np.ndarray:
    """``count`` values with mean 0 and variance 1 from SplitMix64 over ``0..count-1`` in
    ``stream``: integer arithmetic only, so identical on every machine and numpy/torch version
    (torch's RNG and transformers' init order are not promised to stay put)."""
    with np.errstate(over="ignore"):
        x = np.arange(count, dtype=np.uint64) + np.uint64(stream) * np.uint64(0x9E3779B97F4A7C15)
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x = x * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    uniform = (x >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # 24 bits: exact in fp32
    return (uniform - 0.5) * np.sqrt(12.0)


def deterministic_tiny_llama(folder: Path, tokenizer_dir: Path, scale: float = 0.3) -> Path:
    """The tiny Llama with every weight a fixed function of its name's position (SplitMix64,
    norms 1): the same bytes on every machine, so golden outputs can be compared against it.

    ``scale`` 0.3 makes the distributions peaked enough (max p ~0.02) that masks, ranks and
    top-1 tokens vary across a row instead of all sitting at ~1/vocab.
    """
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_llama_config(tokenizer_dir))
    with torch.no_grad():
        for stream, (name, param) in enumerate(sorted(model.named_parameters()), start=1):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            values = splitmix_normalish(param.numel(), stream) * scale
            param.copy_(torch.from_numpy(values.astype(np.float32)).reshape(param.shape))
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return folder
