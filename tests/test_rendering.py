"""Response spans on real templates: decoding the masked tokens gives back the assistant turns."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profit_prep.errors import RowError
from profit_prep.rendering import PLAIN_TEMPLATE, Renderer, tokenizer_fingerprint
from tests.conftest import FIXTURES

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "Look it up."},
    {"role": "assistant", "content": "Calling the calculator."},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "The tool agrees: 4.\nDone."},
]

# template name -> (template text or None for the tokenizer's own, end-of-turn marker)
TEMPLATES = {
    "smollm2_chatml": (None, "<|im_end|>"),
    "llama3_style": ((FIXTURES / "llama3.jinja").read_text(), "<|eot_id|>"),
    "qwen_default_system": ((FIXTURES / "qwen_default_system.jinja").read_text(), "<|im_end|>"),
    "plain": (PLAIN_TEMPLATE, "<|im_end|>"),  # eos_token of SmolLM2
}


def masked_runs(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decode each contiguous run of response tokens separately."""
    runs, current = [], []
    for token, keep in zip(ids.tolist(), mask.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def with_llama3_specials(tokenizer: Any) -> Any:
    """A copy of the tokenizer where Llama-3's header and end-of-turn markers are special tokens,
    as they are in a real Llama-3 tokenizer (otherwise BPE merges across them)."""
    tokenizer = copy.deepcopy(tokenizer)
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer


@pytest.mark.parametrize("name", TEMPLATES)
def test_masked_spans_are_exactly_the_assistant_turns(smollm2_tokenizer: Any, name: str) -> None:
    template, eot = TEMPLATES[name]
    tokenizer = smollm2_tokenizer
    if name == "llama3_style":
        tokenizer = with_llama3_specials(tokenizer)
    ex = Renderer(tokenizer, template).render(CONVERSATION)
    expected = [m["content"] + eot for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(tokenizer, ex.input_ids, ex.response_mask) == expected
    # Nothing of the system prompt, the user turns or the tool output is trained.
    unmasked = tokenizer.decode(ex.input_ids[~ex.response_mask])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in unmasked


def test_default_system_prompt_is_never_trained(smollm2_tokenizer: Any) -> None:
    template = TEMPLATES["qwen_default_system"][0]
    ex = Renderer(smollm2_tokenizer, template).render(CONVERSATION[1:3])
    text = smollm2_tokenizer.decode(ex.input_ids)
    assert "You are Qwen" in text
    assert masked_runs(smollm2_tokenizer, ex.input_ids, ex.response_mask) == ["It is 4.<|im_end|>"]


def test_ids_equal_the_trainers_own_tokenization(smollm2_tokenizer: Any) -> None:
    """TRL tokenizes apply_chat_template(messages) as a whole; our ids must be the same."""
    ex = Renderer(smollm2_tokenizer).render(CONVERSATION)
    theirs = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    if isinstance(theirs, dict) or hasattr(theirs, "keys"):
        theirs = theirs["input_ids"]
    assert ex.input_ids.tolist() == list(theirs)


def test_truncation_is_recorded_and_keeps_alignment(smollm2_tokenizer: Any) -> None:
    full = Renderer(smollm2_tokenizer).render(CONVERSATION)
    cut = Renderer(smollm2_tokenizer, max_length=40).render(CONVERSATION)
    assert cut.truncated and not full.truncated
    assert cut.n_original == len(full.input_ids) and len(cut.input_ids) == 40
    assert np.array_equal(cut.input_ids, full.input_ids[:40])
    assert np.array_equal(cut.response_mask, full.response_mask[:40])


def test_no_response_left_after_truncation_is_rejected(smollm2_tokenizer: Any) -> None:
    with pytest.raises(RowError, match="no response tokens within max_length 10"):
        Renderer(smollm2_tokenizer, max_length=10).render(CONVERSATION)


def test_fingerprint_names_the_part_that_changed(smollm2_tokenizer: Any) -> None:
    a = tokenizer_fingerprint(smollm2_tokenizer, "template A")
    b = tokenizer_fingerprint(smollm2_tokenizer, "template B")
    assert a["vocab"] == b["vocab"] and a["special_tokens"] == b["special_tokens"]
    assert a["chat_template"] != b["chat_template"] and a["fingerprint"] != b["fingerprint"]


# Text without leading/trailing whitespace: a BPE token may merge a template's newline with a
# leading newline of the content, which is then (rightly) part of the response span.
TEXT = st.text(
    alphabet=st.characters(
        codec="utf-8", categories=("L", "N", "P", "Zs"), exclude_characters="<>|"
    ),
    min_size=1,
    max_size=40,
).map(str.strip).filter(bool)
# ... sometimes with special-token strings inside, which must stay text (issue: forged turns).
TEXT = st.lists(
    st.one_of(TEXT, st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])),
    min_size=1,
    max_size=4,
).map("".join)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(TEXT)})
            messages.append({"role": "tool", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(conversation=conversations())
def test_property_masked_tokens_decode_to_assistant_texts(
    smollm2_tokenizer: Any, conversation: list[dict[str, str]]
) -> None:
    ex = Renderer(smollm2_tokenizer).render(conversation)
    decoded = smollm2_tokenizer.decode(ex.input_ids[ex.response_mask])
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    expected = "".join(a + "<|im_end|>" for a in answers)
    assert decoded == expected
