"""Load the trainer's tokenizer, resolve its chat template, and fingerprint both.

The fingerprint (:func:`tokenizer_fingerprint`) hashes everything that decides token ids, part by
part, so that a mismatch between a run's manifest and a trainer's tokenizer can name what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from profit_prep.errors import InputError
from profit_prep.inputs.checks import check_path

# For tokenizers with no chat template: a readable plain-text layout, trained on the answer + EOS.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    # Ends on a newline, not a space: BPE would glue a space to the answer's first word.
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


def load_tokenizer(path: str | Path) -> Any:
    """Load a fast tokenizer from a model folder (offsets are needed to map response spans)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"tokenizer {path}: cannot load ({str(exc).splitlines()[0]})") from None
    if not tokenizer.is_fast:
        raise InputError(f"tokenizer {path}: a fast (Rust) tokenizer is needed for offsets")
    return tokenizer


def resolve_template(tokenizer: Any, template: str | Path | None) -> tuple[str, str]:
    """The chat template to use and where it came from: a file, the tokenizer, or plain text."""
    if template is not None:
        check_path(str(template), "--chat-template")
        path = Path(template)
        if not path.is_file():
            what = "not found" if not path.exists() else "not a file"
            raise InputError(f"chat template file {template} {what}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"chat template file {template} is not UTF-8 text") from None
        if not text.strip():
            # Refused rather than read as "the tokenizer's template": the manifest would record
            # one template and the ids come from another.
            raise InputError(f"chat template file {template} is empty; omit --chat-template to "
                             "use the tokenizer's own template")
        return text, f"file:{path.name}"
    if getattr(tokenizer, "chat_template", None):
        if isinstance(tokenizer.chat_template, dict):  # several named templates: use "default"
            return tokenizer.chat_template["default"], "tokenizer:default"
        return tokenizer.chat_template, "tokenizer"
    return PLAIN_TEMPLATE, "builtin:plain"


# Tokenizer settings (init kwargs) that change ids or the text offsets map back to.
_ID_SETTINGS = ("add_bos_token", "add_eos_token", "add_prefix_space",
                "clean_up_tokenization_spaces", "split_special_tokens", "do_lower_case", "legacy",
                "truncation_side")


def _backend_state(tokenizer: Any) -> Any:
    """The fast tokenizer's whole pipeline (normalizer, pre-tokenizer, model with vocabulary
    and merges, post-processor, decoder, added tokens) as JSON, without the truncation and
    padding state a call may leave on it, and with merges in one spelling whatever the
    ``tokenizers`` version (``"a b"`` or ``["a", "b"]``). The model's vocabulary is left to the
    fingerprint's ``vocab`` part."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    model = state.get("model")
    if isinstance(model, dict):
        model.pop("vocab", None)  # the "vocab" part hashes it, sorted by id (and faster)
        if isinstance(model.get("merges"), list):
            model["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return state


def tokenizer_fingerprint(tokenizer: Any, chat_template: str) -> dict[str, str]:
    """Hashes of what decides token ids: vocabulary, special tokens, the backend pipeline
    (normalizer, pre-tokenizer, merges, post-processor, decoder), the settings that change ids
    (``add_bos_token``, ``clean_up_tokenization_spaces``, ...), and the chat template.

    The parts are kept separately so that a mismatch can name what differs. Fingerprints
    written before ``backend`` and ``settings`` existed lack them (docs/format.md).
    """

    def h(obj: Any) -> str:
        blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    vocab = h(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    special = h(
        {
            "map": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "added": {str(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()},
        }
    )
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    settings = {k: getattr(tokenizer, k, init.get(k)) for k in _ID_SETTINGS}
    parts = {"vocab": vocab, "special_tokens": special, "chat_template": h(chat_template),
             "backend": h(_backend_state(tokenizer)), "settings": h(settings)}
    parts["fingerprint"] = h(parts)
    return parts
