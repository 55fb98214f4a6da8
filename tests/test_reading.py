"""Formats: every format maps to chat messages, and unusable rows say why."""

from __future__ import annotations

import pytest

from profit_prep.errors import InputError, RowError
from profit_prep.inputs.formats import FieldMap, detect_format, to_messages
from profit_prep.inputs.sources import open_source
from tests.conftest import GSM8K, need_shared

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_messages_format_keeps_system_and_tool_turns() -> None:
    tool_chat = CHAT + [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]
    assert to_messages({"messages": tool_chat}, "messages", FieldMap()) == tool_chat


def test_sharegpt_roles_map_to_chat_roles() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "h"},
            {"from": "function_call", "value": "call()"},
            {"from": "observation", "value": "result"},
            {"from": "gpt", "value": "g"},
        ]
    }
    assert detect_format(row, FieldMap()) == "sharegpt"
    roles = [m["role"] for m in to_messages(row, "sharegpt", FieldMap())]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]


def test_alpaca_joins_instruction_and_input() -> None:
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "S"}
    assert detect_format(row, FieldMap()) == "alpaca"
    assert to_messages(row, "alpaca", FieldMap()) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


def test_prompt_completion_strings_and_message_lists() -> None:
    row = {"prompt": "p", "completion": "c"}
    assert detect_format(row, FieldMap()) == "prompt_completion"
    assert [m["content"] for m in to_messages(row, "prompt_completion", FieldMap())] == ["p", "c"]
    row = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    assert to_messages(row, "prompt_completion", FieldMap()) == CHAT


def test_mapped_fields_on_real_gsm8k() -> None:
    path = need_shared(GSM8K)
    fields = FieldMap(prompt_field="question", response_field="answer")
    rows = open_source(path).read(0, 50)
    for row in rows:
        assert detect_format(row.data, fields) == "fields"
        messages = to_messages(row.data, "fields", fields)
        assert messages[0] == {"role": "user", "content": row.data["question"]}
        assert messages[1] == {"role": "assistant", "content": row.data["answer"]}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "ends on a user turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
         "empty assistant response"),
        ({"messages": [{"role": "wizard", "content": "q"}]}, "unknown role 'wizard'"),
        ({"messages": [{"role": "user", "content": None}]}, "content must be a string, got null"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "content must be a string, got list"),
        ({"messages": "hello"}, "must be a list"),
        ({"messages": []}, "empty conversation"),
    ],
)
def test_unusable_rows_raise_row_error_with_reason(row: dict, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        to_messages(row, "messages", FieldMap())


def test_missing_field_is_a_row_error() -> None:
    with pytest.raises(RowError, match="missing field 'output'"):
        to_messages({"instruction": "x"}, "alpaca", FieldMap())


def test_undetectable_format_names_the_columns() -> None:
    with pytest.raises(InputError, match=r"\['x', 'y'\]"):
        detect_format({"x": 1, "y": 2}, FieldMap())


