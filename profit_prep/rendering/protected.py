"""Keep special-token text inside a row's data as text when it is tokenized.

Text such as ``<|im_start|>`` inside a message is data, not markup: tokenized as a special token
it would let a row forge turns and shift the response spans. :class:`ProtectedTokenization` is
the part of :class:`profit_prep.rendering.renderer.Renderer` that finds such data strings, locates
them in
the rendered text and tokenizes around them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from profit_prep.errors import RowError
from profit_prep.inputs.formats import ROLES

_MARKER = re.compile("\ue000([0-9]+)\ue001")
_MARKER_CHARS = re.compile("[\ue000\ue001]")


class ProtectedTokenization:
    """Special-token bookkeeping and protected tokenization for one tokenizer (a mixin of
    :class:`~profit_prep.rendering.renderer.Renderer`, which sets ``tokenizer`` and
    ``chat_template``)."""

    tokenizer: Any
    chat_template: str

    def _init_special_tokens(self, tokenizer: Any) -> None:
        # Special tokens only: other added tokens (Qwen3's "<think>") are ordinary vocabulary,
        # which the tokenizer matches in any text, split_special_tokens or not.
        self._special_ids = {
            t.content: i
            for i, t in tokenizer.added_tokens_decoder.items()
            if t.content and t.special
        }
        specials = sorted(self._special_ids, key=len, reverse=True)
        self.special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        # Data that starts with the end of a special-token string, ends with its start, or is a
        # piece of its middle could complete one with the template text next to it.
        self._max_special = max(map(len, specials), default=0)
        self._heads = frozenset(s[:k] for s in specials for k in range(1, len(s)))
        self._tails = frozenset(s[k:] for s in specials for k in range(1, len(s)))
        self._all_specials = "\x00".join(specials)  # text inside a special token is ``in`` it
        firsts = "".join(sorted({s[0] for s in specials}))
        lasts = "".join(sorted({s[-1] for s in specials}))
        never = re.compile("(?!)")
        self._special_re = self.special_pattern or never
        self._first_char = re.compile(f"[{re.escape(firsts)}]") if firsts else never
        self._last_char = re.compile(f"[{re.escape(lasts)}]") if lasts else never

    # Text such as "<|im_start|>" inside a message is data, not markup: tokenized as a special
    # token it would let a row forge turns and shift the response spans. The guarantee: the
    # special tokens of ``input_ids`` (their ids, number and order) are exactly those of the
    # template's own text, whatever the data; special-token strings in the data stay text.
    #
    # Data strings that hold no special-token text and cannot complete one with the template
    # text beside them (nearly every row) take the fast path: one tokenizer call on the rendered
    # text. For the others the template is rendered once more with each such string replaced by
    # a unique marker (private-use characters, never part of a special token); the real text
    # must be that rendering with each marker replaced by its string (as is, or trimmed, or
    # JSON-escaped as ``tojson`` writes it), which gives the strings' exact character ranges.
    # Special tokens are then matched only outside those ranges. A template that transforms such
    # a string beyond that is rejected per row, never guessed (unless the string only might have
    # completed a special token, and the template text beside it cannot: ``_cannot_join``).

    def _suspicious(self, text: str) -> bool:
        """Whether a data string holds special-token text, could complete a special-token string
        with the text before or after it, or holds marker characters."""
        if not text:
            return False
        if self._special_re.search(text) or "\ue000" in text or "\ue001" in text:
            return True
        width = min(len(text), self._max_special - 1)
        # Cheap unless a special token's first (last) character is near the end (start).
        heads, tails = self._heads, self._tails
        if self._first_char.search(text, len(text) - width) and any(
            text[-k:] in heads for k in range(1, width + 1)
        ):
            return True
        if self._last_char.search(text, 0, width) and any(
            text[:k] in tails for k in range(1, width + 1)
        ):
            return True
        return len(text) < self._max_special and "\x00" not in text and text in self._all_specials

    def _suspicious_value(self, value: Any) -> bool:
        if isinstance(value, str):
            return self._suspicious(value)
        if isinstance(value, dict):
            return any(
                (isinstance(k, str) and self._suspicious(k)) or self._suspicious_value(v)
                for k, v in value.items()
            )
        if isinstance(value, (list, tuple)):
            return any(map(self._suspicious_value, value))
        return False

    def _suspicious_message(self, message: dict[str, Any]) -> bool:
        # Field names are the template's vocabulary and a known role is structure, not data.
        for key, value in message.items():
            if key == "role" and value in ROLES:
                continue
            if isinstance(value, str):
                if self._suspicious(value):
                    return True
            elif self._suspicious_value(value):
                return True
        return False

    def _mark(self, value: Any, originals: list[str], where: list[str], path: str) -> Any:
        """``value`` with every suspicious string (dictionary keys included) replaced by a marker
        that records its index in ``originals``."""
        if isinstance(value, str):
            if not self._suspicious(value):
                return value
            originals.append(value)
            where.append(path)
            return f"\ue000{len(originals) - 1}\ue001"
        if isinstance(value, dict):
            return {
                self._mark(k, originals, where, f"{path} key") if isinstance(k, str) else k: (
                    self._mark(v, originals, where, f"{path}.{k}")
                )
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self._mark(v, originals, where, f"{path}[{j}]") for j, v in enumerate(value)]
        return value

    def _data_ranges(
        self, messages: list[dict[str, Any]], full: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[tuple[int, int]] | None:
        """Character ranges of ``full`` that render the messages' suspicious strings; None when
        they cannot be located but the tokenizer's own split of ``full`` is shown to be right."""
        originals: list[str] = []
        where: list[str] = []
        marked = []
        for i, message in enumerate(messages):
            marked.append(
                {
                    key: value
                    if key == "role" and value in ROLES
                    else self._mark(value, originals, where, f"message {i} {key}")
                    for key, value in message.items()
                }
            )
        marked_tools = None if tools is None else self._mark(tools, originals, where, "tools")
        try:
            skeleton = self.tokenizer.apply_chat_template(
                marked,
                chat_template=self.chat_template,
                tools=marked_tools,
                tokenize=False,
                add_generation_prompt=False,
            )
        except Exception:  # noqa: BLE001 - the template depends on the text: it cannot be located
            skeleton = None
        ranges = _locate(skeleton, full, originals) if isinstance(skeleton, str) else None
        if ranges is None:
            hard = [j for j, s in enumerate(originals) if s != _MARKER_CHARS.sub("", s)]
            hard += [j for j, s in enumerate(originals) if self._special_re.search(s)]
            # Strings that might only complete a special token with their neighbours are fine
            # when the template puts no piece of one beside them and adds none.
            if not hard and isinstance(skeleton, str) and self._cannot_join(skeleton, full):
                return None
            k = hard[-1] if hard else 0
            found = self._special_re.search(originals[k])
            if found:
                what = f"special-token text {found.group()!r}"
            elif hard:
                what = "private-use characters U+E000/U+E001"
            else:
                what = "text that could join the template's text into a special token"
            raise RowError(
                f"{where[k]} contains {what}, and the chat template renders it transformed, so "
                "it cannot be told apart from the template's own special tokens"
            )
        return ranges

    def _cannot_join(self, skeleton: str, full: str) -> bool:
        """Whether ``full`` has the skeleton's special tokens and no marker in the skeleton stands
        beside template text that could be part of a special-token string, or beside another."""
        if [m.group() for m in self._special_re.finditer(full)] != [
            m.group() for m in self._special_re.finditer(skeleton)
        ]:
            return False
        width, previous_end = self._max_special - 1, -1
        for marker in _MARKER.finditer(skeleton):
            a, b = marker.span()
            before, after = skeleton[max(0, a - width) : a], skeleton[b : b + width]
            if (
                a == previous_end
                or any(before[-k:] in self._heads for k in range(1, len(before) + 1))
                or any(after[:k] in self._tails for k in range(1, len(after) + 1))
            ):
                return False
            previous_end = b
        return True

    def _tokenize_protected(
        self, full: str, protected: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize like the tokenizer does (special tokens first, then the text between them),
        except that special tokens are matched only outside the sorted, disjoint ``protected``
        ranges: special-token strings inside them (or reaching into them) stay text."""
        assert self.special_pattern is not None
        cuts: list[tuple[int, int]] = []
        cursor = 0
        for a, b in [*protected, (len(full), len(full))]:
            cuts += [m.span() for m in self.special_pattern.finditer(full, cursor, a)]
            cursor = b
        # The text between special tokens, in one batch call, then everything in order.
        order: list[tuple[int, int, bool]] = []  # start, end, is a special token
        start = 0
        for a, b in [*cuts, (len(full), len(full))]:
            if a > start:
                order.append((start, a, False))
            order.append((a, b, True))
            start = b
        order.pop()  # the end sentinel
        texts = [full[a:b] for a, b, special in order if not special]
        enc = (
            self.tokenizer(
                texts,
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            if texts
            else {"input_ids": [], "offset_mapping": []}
        )
        encoded = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b, special in order:
            if special:
                ids.append(self._special_ids[full[a:b]])
                offsets.append((a, b))
            else:
                piece_ids, piece_offsets = next(encoded)
                ids += piece_ids
                offsets += [(x + a, y + a) for x, y in piece_offsets]
        return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def text_variants(text: str) -> list[str]:
    """How a template may write a string: as is, trimmed (Llama 3), or inside ``tojson``."""
    out = [text]
    for variant in (text.strip(), json.dumps(text, ensure_ascii=False)[1:-1]):
        if variant not in out:
            out.append(variant)
    return out


def _locate(skeleton: str, full: str, originals: list[str]) -> list[tuple[int, int]] | None:
    """The ranges of ``full`` where ``skeleton``'s markers stand, when ``full`` is exactly the
    skeleton with each marker replaced by (a variant of) its original string; else None.

    A marker may occur any number of times (a template may drop a system prompt or repeat a
    string); each occurrence must match.
    """
    parts = _MARKER.split(skeleton)
    texts, keys = parts[0::2], parts[1::2]
    if any("\ue000" in t or "\ue001" in t for t in texts) or not full.startswith(texts[0]):
        return None
    ranges = []
    cursor = len(texts[0])
    for n, (key, after) in enumerate(zip(keys, texts[1:], strict=True)):
        index = int(key)
        if index >= len(originals):
            return None
        last = n == len(keys) - 1
        for variant in text_variants(originals[index]):
            end = cursor + len(variant)
            if (
                full.startswith(variant, cursor)
                and full.startswith(after, end)
                and (not last or end + len(after) == len(full))
            ):
                break
        else:
            return None
        if end > cursor:
            ranges.append((cursor, end))
        cursor = end + len(after)
    return ranges if cursor == len(full) else None
