"""Read SFT datasets and turn every row into a list of chat messages.

:func:`to_messages` turns one raw row (from a :mod:`profit_prep.inputs.sources` source) into
``[{"role": ..., "content": ...}, ...]`` or raises :class:`RowError` with the reason.

Formats (``auto`` detects each row's format from its own keys, so one file may mix them):

========================  =================================================================
``messages``              ``messages``: ``[{role, content}]`` (OpenAI / TRL conversational)
``sharegpt``              ``conversations``: ``[{from, value}]`` (human, gpt, system,
                          function_call, observation)
``alpaca``                ``instruction``, ``input``, ``output``, optional ``system``
``prompt_completion``     TRL ``prompt`` / ``completion``, strings or message lists
``fields``                any columns: ``prompt_field`` / ``response_field`` (+ ``system_field``)
========================  =================================================================

Example:
    >>> rows = open_source("data.jsonl").read(0, 10)  # doctest: +SKIP
    >>> fmt = detect_format(rows[0].data, FieldMap())  # doctest: +SKIP
    >>> messages = to_messages(rows[0].data, fmt, FieldMap())  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from profit_prep.errors import InputError, RowError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "fields")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # LLaMA-Factory's convention: the assistant emits the call (trained), the tool answers (not).
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


@dataclass(frozen=True)
class FieldMap:
    """User-chosen column names; ``None`` means the format's own default."""

    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str | None = None
    id_field: str | None = None


# --------------------------------------------------------------------------- formats


def detect_format(row: Mapping[str, Any], fields: FieldMap) -> str:
    """Pick the format from one row's keys (user column mapping wins)."""
    if fields.prompt_field or fields.response_field:
        return "fields"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise InputError(
        f"cannot detect the format from columns {sorted(row)}; pass --format, or map columns "
        "with --prompt-field and --response-field"
    )


def detect_row_format(row: Mapping[str, Any], fields: FieldMap) -> str:
    """:func:`detect_format` for one row of an ``auto`` input: a row of no known format is
    rejected alone (:class:`RowError`), the rest of the file is still read."""
    try:
        return detect_format(row, fields)
    except InputError:
        raise RowError(f"cannot detect the format from columns {sorted(row)}") from None


def required_columns(fmt: str, fields: FieldMap) -> list[str]:
    """Columns a format needs; used to give one clear error before any row is processed."""
    return {
        "messages": ["messages"],
        "sharegpt": ["conversations"],
        "alpaca": ["instruction", "output"],
        "prompt_completion": ["prompt", "completion"],
        "fields": [fields.prompt_field or "prompt", fields.response_field or "response"],
    }[fmt]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise RowError(f"{what} must be a string, got {got}")
    return value


def _optional_text(row: Mapping[str, Any], key: str | None) -> str | None:
    """An optional text column: absent, null or ``""`` is "none"; any other value must be a
    string (``0`` or ``false`` is data that would vanish, so it is a reason, never skipped)."""
    if key is None or row.get(key) is None or row.get(key) == "":
        return None
    return _text(row[key], key)


def _message(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise RowError(f"{where} is not an object")
    role = raw.get("role")
    if role not in ROLES:
        raise RowError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    message = dict(raw)
    if role == "assistant" and raw.get("content") is None and raw.get("tool_calls"):
        message["content"] = ""
    else:
        message["content"] = _text(raw.get("content"), f"{where} content")
    return message


def _messages(raw: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise RowError(f"{what} must be a list of messages")
    return [_message(m, f"{what}[{i}]") for i, m in enumerate(raw)]


def _sharegpt(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise RowError("conversations must be a list of turns")
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, Mapping):
            raise RowError(f"conversations[{i}] is not an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}] has unknown speaker {speaker!r}")
        content = _text(turn.get("value"), f"conversations[{i}] value")
        # Other keys of the turn go along: the renderer rejects the row if the template
        # ignores one that holds data, rather than dropping it here unseen.
        extra = {k: v for k, v in turn.items() if k not in ("from", "value")}
        out.append({**extra, "role": SHAREGPT_ROLES[speaker], "content": content})
    return out


def _history(raw: Any) -> list[dict[str, Any]]:
    """Alpaca's (LLaMA-Factory's) ``history``: earlier ``[prompt, response]`` pairs, as turns."""
    if raw is None or raw == [] or raw == "":
        return []
    if not isinstance(raw, list):
        raise RowError("history must be a list of [prompt, response] pairs")
    out = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"history[{i}] must be a [prompt, response] pair")
        out.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        out.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    return out


def row_tools(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The row's ``tools`` column (TRL's tool-calling format: a list of JSON-schema function
    definitions, or that list as a JSON string, as LLaMA-Factory stores it), for the chat
    template's ``tools`` argument; None when the row has none."""
    raw = row.get("tools")
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise RowError("tools is a string but not valid JSON") from None
        if raw is None or raw == []:
            return None
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise RowError("tools must be a list of function definitions (objects)")
    return [dict(t) for t in raw]


def to_messages(row: Mapping[str, Any], fmt: str, fields: FieldMap) -> list[dict[str, Any]]:
    """Normalise one row to chat messages; raise :class:`RowError` with the reason if unusable."""
    missing = [c for c in required_columns(fmt, fields) if c not in row]
    if missing:
        raise RowError(f"missing field {missing[0]!r} for format {fmt}")
    if fmt == "messages":
        messages = _messages(row["messages"], "messages")
    elif fmt == "sharegpt":
        messages = _sharegpt(row["conversations"])
        system = _optional_text(row, "system")
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "alpaca":
        instruction = _text(row["instruction"], "instruction")
        extra = _optional_text(row, "input")
        prompt = f"{instruction}\n\n{extra}" if extra is not None else instruction
        messages = _history(row.get("history"))
        messages.append({"role": "user", "content": prompt})
        system = _optional_text(row, "system")
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "assistant", "content": _text(row["output"], "output")})
    elif fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            messages = _messages(prompt, "prompt") + _messages(completion, "completion")
        else:
            messages = [
                {"role": "user", "content": _text(prompt, "prompt")},
                {"role": "assistant", "content": _text(completion, "completion")},
            ]
    elif fmt == "fields":
        pf, rf = required_columns(fmt, fields)
        messages = [
            {"role": "user", "content": _text(row[pf], pf)},
            {"role": "assistant", "content": _text(row[rf], rf)},
        ]
        system = _optional_text(row, fields.system_field)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
    else:
        raise InputError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_conversation(messages)
    return messages


def check_conversation(messages: list[dict[str, Any]]) -> None:
    """Reject conversations with nothing to train on, or that no template renders as meant."""
    if not messages:
        raise RowError("empty conversation")
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None:
        raise RowError("conversation has only system turns, no assistant turn")
    if messages[first]["role"] != "user":
        # A turn with no user turn before it answers nothing (and chat templates start the
        # conversation at a user turn): say so, rather than let a template fail on it.
        role = messages[first]["role"]
        article = "an" if role[0] in "aeiou" else "a"
        raise RowError(f"conversation starts with {article} {role} turn (turn {first}), not a "
                       "user turn")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"conversation ends on a {messages[-1]['role']} turn, not an assistant turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RowError(f"empty assistant response (turn {i})")
