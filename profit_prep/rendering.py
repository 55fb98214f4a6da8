"""Render conversations with the trainer's chat template and mark the response tokens.

Many chat templates (SmolLM2's among them) have no ``{% generation %}`` markers, so
``return_assistant_tokens_mask`` cannot be trusted. We locate each assistant turn in the rendered
text instead: rendering the conversation up to turn *i* with ``add_generation_prompt=True`` gives
the text where the answer starts; rendering it up to and including turn *i* gives where the
answer (and its end-of-turn token) ends. Both must be prefixes of the full rendering, which holds
for every template that renders a conversation left to right; a template that does not (one that
rewrites earlier turns) is rejected per row, never guessed. Tokens are then mapped to those
character spans through the fast tokenizer's offsets.

Example:
    >>> renderer = Renderer(tokenizer, max_length=4096)  # doctest: +SKIP
    >>> ex = renderer.render([{"role": "user", "content": "Hi"},
    ...                       {"role": "assistant", "content": "Hello!"}])  # doctest: +SKIP
    >>> tokenizer.decode(ex.input_ids[ex.response_mask])  # doctest: +SKIP
    'Hello!<|im_end|>'
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError, RowError

# For tokenizers with no chat template: a readable plain-text layout, trained on the answer + EOS.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    # Ends on a newline, not a space: BPE would glue a space to the answer's first word.
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


@dataclass
class Rendered:
    """A rendered, tokenized example."""

    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool, True on tokens the trainer trains on
    truncated: bool
    n_original: int  # tokens before truncation


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
        path = Path(template)
        if not path.is_file():
            raise InputError(f"chat template file {template} not found")
        return path.read_text(encoding="utf-8"), f"file:{path.name}"
    if getattr(tokenizer, "chat_template", None):
        if isinstance(tokenizer.chat_template, dict):  # several named templates: use "default"
            return tokenizer.chat_template["default"], "tokenizer:default"
        return tokenizer.chat_template, "tokenizer"
    return PLAIN_TEMPLATE, "builtin:plain"


def tokenizer_fingerprint(tokenizer: Any, chat_template: str) -> dict[str, str]:
    """Hashes of what decides token ids: vocabulary, special tokens, and the chat template.

    The parts are kept separately so that a mismatch can name what differs.
    """

    def h(obj: Any) -> str:
        blob = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    vocab = h(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    special = h(
        {
            "map": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "added": {str(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()},
        }
    )
    template = h(chat_template)
    parts = {"vocab": vocab, "special_tokens": special, "chat_template": template}
    parts["fingerprint"] = h(parts)
    return parts


class Renderer:
    """Renders conversations into ``input_ids`` and ``response_mask`` for one tokenizer."""

    def __init__(
        self, tokenizer: Any, chat_template: str | None = None, max_length: int = 4096
    ) -> None:
        if max_length < 2:
            raise InputError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.chat_template = chat_template or resolve_template(tokenizer, None)[0]
        self.max_length = max_length
        specials = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.content},
            key=len,
            reverse=True,
        )
        self.special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None

    def _text(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as exc:  # noqa: BLE001 - template errors are per-row input problems
            raise RowError(f"chat template failed: {type(exc).__name__}: {exc}") from None

    def response_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character span of every assistant turn."""
        full = self._text(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = self._text(messages[:i], True)
            end_text = self._text(messages[: i + 1], False)
            if not (full.startswith(end_text) and end_text.startswith(start_text)):
                raise RowError(
                    f"chat template renders assistant turn {i} differently inside the "
                    "conversation than on its own, so its tokens cannot be located"
                )
            end = len(end_text)
            # The end-of-turn token is trained; the whitespace a template puts after it is not.
            while end > len(start_text) and end_text[end - 1].isspace():
                end -= 1
            spans.append((len(start_text), end))
        return full, spans

    def render(self, messages: list[dict[str, Any]]) -> Rendered:
        full, spans = self.response_spans(messages)
        protected = self._content_with_special_text(messages, full)
        if protected:
            ids, offsets = self._tokenize_protected(full, protected)
        else:  # the common case: exactly the trainer's own tokenization of the rendered text
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int32)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            # A token belongs to the answer when its characters overlap the answer's span;
            # zero-width tokens count when they sit inside it.
            mask |= ((ends > s) & (starts < e)) | ((starts == ends) & (starts >= s) & (starts < e))
        n_original = len(ids)
        truncated = n_original > self.max_length
        if truncated:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        if not mask.any():
            if truncated:
                raise RowError(
                    f"no response tokens within max_length {self.max_length} "
                    f"(row has {n_original} tokens)"
                )
            raise RowError("no response tokens after rendering")
        return Rendered(ids, mask, truncated, n_original)

    # Text such as "<|im_start|>" inside a message is data, not markup: tokenized as a special
    # token it would let a row forge turns and shift the response spans.

    def _content_with_special_text(
        self, messages: list[dict[str, Any]], full: str
    ) -> list[tuple[int, int]]:
        """Character ranges of message contents that contain special-token strings."""
        if self.special_pattern is None:
            return []
        ranges, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            pos = full.find(content, cursor) if content else -1
            if pos < 0 and content.strip():
                content = content.strip()  # templates that trim (Llama 3) render it stripped
                pos = full.find(content, cursor)
            if pos >= 0:
                cursor = pos + len(content)
            if not self.special_pattern.search(m["content"]):
                continue
            if pos < 0:
                raise RowError(
                    f"message {i} contains special-token text that the chat template altered, "
                    "so it cannot be kept as plain text"
                )
            ranges.append((pos, pos + len(content)))
        return ranges

    def _tokenize_protected(
        self, full: str, protected: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize like the tokenizer does (special tokens first, then the text between them),
        except that special-token strings inside ``protected`` ranges stay text."""
        assert self.special_pattern is not None

        def inside(s: int, e: int) -> bool:
            return any(a <= s and e <= b for a, b in protected)

        cuts = [m for m in self.special_pattern.finditer(full) if not inside(*m.span())]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        cursor = 0
        for match in [*cuts, None]:
            stop = match.start() if match else len(full)
            if stop > cursor:
                enc = self.tokenizer(
                    full[cursor:stop],
                    add_special_tokens=False,
                    split_special_tokens=True,
                    return_offsets_mapping=True,
                )
                ids += enc["input_ids"]
                offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            if match:
                ids.append(self.tokenizer.convert_tokens_to_ids(match.group()))
                offsets.append(match.span())
                cursor = match.end()
        return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
