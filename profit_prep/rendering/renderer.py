"""Render conversations with the trainer's chat template and mark the response tokens.

Many chat templates (SmolLM2's among them) have no ``{% generation %}`` markers, so
``return_assistant_tokens_mask`` cannot be trusted. We locate each assistant turn in the rendered
text instead: rendering the conversation up to turn *i* with ``add_generation_prompt=True`` gives
the text where the answer starts; rendering it up to and including turn *i* gives where the
answer (and its end-of-turn token) ends. Both must be prefixes of the full rendering, which holds
for every template that renders a conversation left to right; a template that does not (one that
rewrites earlier turns) is rejected per row, never guessed. Tokens are then mapped to those
character spans through the fast tokenizer's offsets.

Cost is linear in a row and bounded by ``max_length``: a row with ``CAP_FACTOR`` times more text
than ``max_length`` tokens could hold (``max_length`` x the longest token's bytes) is rejected
before it is rendered (shorter ones are truncated as before),
and a row of more than ``PREFIX_TURNS`` assistant turns is located in one pass (each answer
replaced by a marker, :meth:`Renderer._marked_spans`) instead of two renders per turn, which
is quadratic in the turns.

Every field of a conversation reaches the text or the row is rejected naming it: a row's
``tools`` go to the template's ``tools`` argument, and a message field or ``tools`` that the
template ignores (the text is the same without it) is a reason (:meth:`Renderer._check_fields`).

Special-token strings inside messages (``<|im_start|>`` typed by a user) stay text: the special
tokens of ``input_ids`` are always exactly the template's own, whatever the content (see
:mod:`profit_prep.rendering.protected`).

Example:
    >>> renderer = Renderer(tokenizer, max_length=4096)  # doctest: +SKIP
    >>> ex = renderer.render([{"role": "user", "content": "Hi"},
    ...                       {"role": "assistant", "content": "Hello!"}])  # doctest: +SKIP
    >>> tokenizer.decode(ex.input_ids[ex.response_mask])  # doctest: +SKIP
    'Hello!<|im_end|>'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from profit_prep.errors import InputError, RowError
from profit_prep.rendering.protected import ProtectedTokenization, text_variants
from profit_prep.rendering.tokenizer import (
    PLAIN_TEMPLATE,
    load_tokenizer,
    resolve_template,
    tokenizer_fingerprint,
)

# Re-exported: the tokenizer's loading and identity were part of this module.
__all__ = ["PLAIN_TEMPLATE", "Rendered", "Renderer", "end_of_turn_ids", "load_tokenizer",
           "resolve_template", "tokenizer_fingerprint"]

# Rows of up to this many assistant turns are located turn by turn (two renders a turn: exact
# for any left-to-right template); longer ones in one pass, checked on their first and last turn.
PREFIX_TURNS = 8
# A row with more than CAP_FACTOR * max_length * (the longest token's bytes) characters of text
# is rejected before it is rendered (Renderer._check_size).
CAP_FACTOR = 16
# Message fields besides role and content that one row may hold (one render each is checked).
MAX_EXTRA_FIELDS = 16
# An OpenAI correlation id: templates place tool answers by order, not by it, so none renders it.
NOT_RENDERED = frozenset({"tool_call_id"})
TEMPLATE_FAILED = "chat template failed"
_TURN = re.compile("\ue002([0-9]+)\ue003")


@dataclass
class Rendered:
    """A rendered, tokenized example."""

    input_ids: np.ndarray  # int32
    response_mask: np.ndarray  # bool, True on tokens the trainer trains on
    truncated: bool
    n_original: int  # tokens before truncation


class Renderer(ProtectedTokenization):
    """Renders conversations into ``input_ids`` and ``response_mask`` for one tokenizer."""

    def __init__(
        self, tokenizer: Any, chat_template: str | None = None, max_length: int = 4096
    ) -> None:
        if max_length < 2:
            raise InputError("max_length must be at least 2")
        self.tokenizer = tokenizer
        self.chat_template = chat_template or resolve_template(tokenizer, None)[0]
        self.max_length = max_length
        # No token decodes to more bytes than its vocabulary string has in UTF-8 (byte-level
        # BPE: a character a byte; SentencePiece: the text itself, a space as 3-byte U+2581), so
        # max_length * token_bytes characters is more than max_length tokens can hold. A row
        # up to CAP_FACTOR times that is rendered and truncated as always; beyond, it is rejected
        # unrendered, which bounds one row's render and tokenization by max_length.
        self.token_bytes = max(
            (len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()), default=1
        )
        self.max_chars = CAP_FACTOR * max_length * max(self.token_bytes, 1)
        self._init_special_tokens(tokenizer)

    def _text(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tools=tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as exc:  # noqa: BLE001 - template errors are per-row input problems
            raise RowError(f"{TEMPLATE_FAILED}: {type(exc).__name__}: {exc}") from None

    def render_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The conversation's text as the chat template writes it (no generation prompt)."""
        return self._text(messages, False, tools)

    def check_template(self) -> None:
        """Compile the chat template: a syntax error is one :class:`InputError` before any row
        (else every row would be rejected with it and the run would exit 0)."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # a transformers without it: the first row says it instead
            return
        import jinja2

        try:
            _compile_jinja_template(self.chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(
                f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
            ) from None

    def response_spans(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character span of every assistant turn."""
        full = self._text(messages, False, tools)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(turns) <= PREFIX_TURNS:
            spans = [self._strip(full, *self._prefix_span(messages, tools, full, i))
                     for i in turns]
        else:
            spans = self._marked_spans(messages, tools, full, turns)
        return full, spans

    @staticmethod
    def _strip(full: str, start: int, end: int) -> tuple[int, int]:
        # The end-of-turn token is trained; the whitespace a template puts after it is not.
        while end > start and full[end - 1].isspace():
            end -= 1
        return start, end

    def _prefix_span(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str,
        i: int,
    ) -> tuple[int, int]:
        """Assistant turn ``i``'s span by definition: from the end of the conversation before it
        with the generation prompt, to the end of the conversation up to and including it."""
        start_text = self._text(messages[:i], True, tools)
        end_text = self._text(messages[: i + 1], False, tools)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise RowError(
                f"chat template renders assistant turn {i} differently inside the "
                "conversation than on its own, so its tokens cannot be located"
            )
        return len(start_text), len(end_text)

    def _marked_spans(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str,
        turns: list[int],
    ) -> list[tuple[int, int]]:
        """Every assistant turn's span from one more render, linear in the row: each answer is
        replaced by a marker, which gives where every answer stands in ``full``; the text the
        first turn's exact span (:meth:`_prefix_span`) holds before and after its answer must
        stand around every answer, and the last turn's span must equal its exact one."""
        fail = RowError(
            f"chat template renders the {len(turns)} assistant turns in a way that cannot be "
            f"located in one pass (rows of up to {PREFIX_TURNS} are located turn by turn)"
        )
        marked = list(messages)
        for j, i in enumerate(turns):
            marked[i] = {**messages[i], "content": f"\ue002{j}\ue003"}
        parts = _TURN.split(self._text(marked, False, tools))
        texts, keys = parts[0::2], parts[1::2]
        if keys != [str(j) for j in range(len(turns))] or not full.startswith(texts[0]) or any(
            "\ue002" in t or "\ue003" in t for t in texts
        ):
            raise fail
        answers = []  # (start, end) of each answer's text in full
        cursor = len(texts[0])
        for j, after in enumerate(texts[1:]):
            last = j == len(turns) - 1
            for variant in text_variants(messages[turns[j]]["content"]):
                end = cursor + len(variant)
                if (full.startswith(variant, cursor) and full.startswith(after, end)
                        and (not last or end + len(after) == len(full))):
                    break
            else:
                raise fail
            answers.append((cursor, end))
            cursor = end + len(after)
        start, end = self._prefix_span(messages, tools, full, turns[0])
        (a0, b0) = answers[0]
        if not start <= a0 <= b0 <= end:
            raise fail
        head, tail = full[start:a0], full[b0:end]
        spans = []
        for a, b in answers:
            if full[a - len(head) : a] != head or full[b : b + len(tail)] != tail:
                raise fail
            spans.append(self._strip(full, a - len(head), b + len(tail)))
        if spans[-1] != self._strip(full, *self._prefix_span(messages, tools, full, turns[-1])):
            raise fail
        return spans

    def _check_size(self, messages: list[dict[str, Any]], tools: Any) -> None:
        """Reject a row with more text than ``max_length`` tokens could hold before it costs a
        render: counted with an early stop, so a huge row costs no more than the bound."""
        total, stack = 0, [messages, tools]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                total += len(value)
            elif isinstance(value, dict):
                total += 1
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                total += 1
                stack.extend(value)
            else:
                total += 1
            if total > self.max_chars:
                raise RowError(
                    f"row is longer than --max-length {self.max_length} allows: over "
                    f"{self.max_chars:,} characters of text, {CAP_FACTOR} times what "
                    f"{self.max_length} tokens of at most {self.token_bytes} bytes each can hold"
                )

    def _check_fields(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str
    ) -> None:
        """Reject the row if the template ignores ``tools`` or a message field that holds data
        (its text is the same without it): the data would vanish from the ids unseen. Generic:
        one render without each such field, for any template."""
        if tools is not None and self._unchanged_without(full, messages, None):
            raise RowError("the chat template ignores the row's 'tools' (the tool definitions "
                           "would not reach the ids): use a template that renders tools")
        keys = sorted({
            k for m in messages for k, v in m.items()
            if k not in ("role", "content") and k not in NOT_RENDERED and _holds_data(v)
        }, key=str)
        if len(keys) > MAX_EXTRA_FIELDS:
            raise RowError(f"messages hold {len(keys)} fields besides role and content (at most "
                           f"{MAX_EXTRA_FIELDS}): {', '.join(map(str, keys[:5]))}, ...")
        for key in keys:
            holders = [i for i, m in enumerate(messages) if _holds_data(m.get(key))]
            # The first and the last message holding it, each alone (a template may render a
            # field for the last turn only), and all at once when more hold it.
            for drop in dict.fromkeys(
                [frozenset(holders[:1]), frozenset(holders[-1:]), frozenset(holders)]
            ):
                without = [{k: v for k, v in m.items() if k != key} if i in drop else m
                           for i, m in enumerate(messages)]
                if self._unchanged_without(full, without, tools):
                    raise RowError(
                        f"the chat template ignores the {key!r} field of message {min(drop)} (its "
                        "data would not reach the ids): use a template that renders it, or "
                        "drop it"
                    )

    def _unchanged_without(
        self, full: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> bool:
        try:
            return self._text(messages, False, tools) == full
        except RowError:  # the template needs what was left out: it is used
            return False

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> Rendered:
        self._check_size(messages, tools)
        full, spans = self.response_spans(messages, tools)
        self._check_fields(messages, tools, full)
        protected = None
        if self.special_pattern is not None:
            try:
                suspicious = any(map(self._suspicious_message, messages)) or (
                    tools is not None and self._suspicious_value(tools)
                )
            except RecursionError:
                raise RowError("message data nested too deeply to check") from None
            if suspicious:
                protected = self._data_ranges(messages, full, tools)
        if protected is not None:
            ids, offsets = self._tokenize_protected(full, protected)
        else:  # the common case: exactly the trainer's own tokenization of the rendered text
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int32)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = _span_mask(offsets, spans)
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


def _span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens belong to an answer: their characters overlap one of the sorted, disjoint
    ``spans``, or, zero-width, they sit inside one. One binary search a token, not one pass a
    span (which is quadratic in a row of many turns)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    spans = [(s, e) for s, e in spans if e > s]
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    span_starts = np.asarray([s for s, _ in spans], dtype=np.int64)
    span_ends = np.asarray([e for _, e in spans], dtype=np.int64)
    # The first span ending after the token starts: the only one it can overlap.
    k = np.searchsorted(span_ends, starts, side="right")
    inside = k < len(spans)
    first = span_starts[np.minimum(k, len(spans) - 1)]
    return inside & np.where(starts == ends, starts >= first, ends > first)


def _holds_data(value: Any) -> bool:
    """Whether a field's value is data that could be lost (``0`` and ``false`` are; null and an
    empty string, list or object, which schema-unified datasets put in every message, are not)."""
    return value is not None and not (isinstance(value, (str, list, tuple, dict)) and not value)



def end_of_turn_ids(renderer: Renderer) -> list[int]:
    """The token ids the chat template closes an assistant turn with (``<|im_end|>``, ...).

    Probe conversations are rendered; their answers hold no special-token text, so every special
    token in a response span is the template's own turn end.
    """
    tokenizer = renderer.tokenizer
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    probes = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
         {"role": "assistant", "content": "d"}],
    ]
    ids: set[int] = set()
    for messages in probes:
        try:
            r = renderer.render(messages)
        except RowError:  # a template that refuses this shape of conversation
            continue
        ids |= {int(t) for t in r.input_ids[r.response_mask] if int(t) in special}
    return sorted(ids)
