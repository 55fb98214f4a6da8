"""Issue 22, the row side: every field of a row reaches the ids or the row is rejected naming it
(B), text that is not valid Unicode is rejected per row or refused up front (C), one row costs
time linear in its text and bounded by --max-length (D), and a broken template or data path is
one accurate line before scoring (F)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import profit_prep.rendering.renderer as rendering
from profit_prep.errors import InputError, RowError
from profit_prep.inputs.formats import FieldMap, row_tools, to_messages
from profit_prep.inputs.sources import ListSource, invalid_text, open_source
from profit_prep.job import rejection, render_rows
from profit_prep.rendering.renderer import PLAIN_TEMPLATE, Renderer, resolve_template
from tests.conftest import FIXTURES, REPO, assert_one_error_line
from tests.test_rendering import TEXT

# Renders tools and tool calls (SmolLM2's own template renders neither).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_TURNS = ASK + [
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]


def render_one(renderer: Renderer, data: dict, fmt: str = "auto") -> tuple[list, list]:
    rows = ListSource([data]).read(0, 1)
    return render_rows(rows, fmt, FieldMap(), renderer)


def reason_of(renderer: Renderer, data: dict, fmt: str = "auto") -> str:
    rendered, rejected = render_one(renderer, data, fmt)
    assert not rendered and len(rejected) == 1, rendered
    return rejected[0]["reason"]


# --------------------------------------------------------------------------- B: tools


@pytest.mark.parametrize("as_json", [False, True], ids=["list", "json-string"])
@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_tools_column_reaches_the_ids(smollm2_tokenizer: Any, as_json: bool, fmt: str) -> None:
    """The oracle: the tokenizer's own apply_chat_template(..., tools=...), as TRL calls it."""
    answer = [{"role": "assistant", "content": "Let me check."}]
    tools = json.dumps(TOOLS) if as_json else TOOLS
    row = ({"messages": ASK + answer, "tools": tools} if fmt == "messages"
           else {"prompt": ASK, "completion": answer, "tools": tools})
    rendered, rejected = render_one(Renderer(smollm2_tokenizer, TOOLS_TEMPLATE), row)
    assert not rejected
    theirs = smollm2_tokenizer.apply_chat_template(
        ASK + answer, tools=TOOLS, chat_template=TOOLS_TEMPLATE, tokenize=True)["input_ids"]
    ids = rendered[0][1].input_ids
    assert ids.tolist() == list(theirs)
    assert "get_weather" in smollm2_tokenizer.decode(ids)


def test_tool_calls_and_tool_turns_render_under_a_template_that_has_them(
    smollm2_tokenizer: Any,
) -> None:
    rendered, rejected = render_one(Renderer(smollm2_tokenizer, TOOLS_TEMPLATE),
                                    {"messages": TOOL_TURNS, "tools": TOOLS})
    assert not rejected
    r = rendered[0][1]
    theirs = smollm2_tokenizer.apply_chat_template(
        TOOL_TURNS, tools=TOOLS, chat_template=TOOLS_TEMPLATE, tokenize=True)["input_ids"]
    assert r.input_ids.tolist() == list(theirs)
    trained = smollm2_tokenizer.decode(r.input_ids[r.response_mask])
    assert trained == json.dumps([CALL]) + "<|im_end|>It is sunny.<|im_end|>"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"messages": ASK + [{"role": "assistant", "content": "ok"}], "tools": TOOLS}, "'tools'"),
        ({"messages": ASK + [{"role": "assistant", "content": "ok"}],
          "tools": json.dumps(TOOLS)}, "'tools'"),
        ({"messages": TOOL_TURNS}, "'tool_calls' field of message 1"),
        ({"messages": ASK + [{"role": "assistant", "content": "4",
                              "reasoning_content": "2+2"}]}, "'reasoning_content'"),
        ({"messages": ASK + [{"role": "assistant", "content": "4", "thinking": "2+2"}]},
         "'thinking'"),
        ({"messages": ASK + [{"role": "assistant", "content": "4", "weight": 0}]}, "'weight'"),
        ({"messages": ASK + [{"role": "assistant", "content": "4", "train": False}]}, "'train'"),
        ({"conversations": [{"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a", "loss": 0.0}]}, "'loss'"),
    ],
)
def test_a_field_the_template_ignores_rejects_the_row_naming_it(
    smollm2_tokenizer: Any, row: dict, field: str
) -> None:
    """SmolLM2's template renders only role and content: whatever else holds data is named."""
    assert field in reason_of(Renderer(smollm2_tokenizer), row)


def test_empty_fields_of_schema_unified_messages_are_not_data(smollm2_tokenizer: Any) -> None:
    """Parquet gives every message every key, mostly null: those rows are fine."""
    nulls = {"tool_calls": None, "name": "", "reasoning_content": None, "extra": [],
             "tool_call_id": "call_1"}
    messages = [{**m, **nulls} for m in ASK + [{"role": "assistant", "content": "Sunny."}]]
    rendered, rejected = render_one(Renderer(smollm2_tokenizer), {"messages": messages})
    assert not rejected
    plain = Renderer(smollm2_tokenizer).render([{"role": m["role"], "content": m["content"]}
                                                for m in messages])
    assert rendered[0][1].input_ids.tolist() == plain.input_ids.tolist()


@pytest.mark.parametrize("tools", [None, "", [], "[]", "null"])
def test_no_tools_is_no_tools(tools: Any) -> None:
    assert row_tools({"tools": tools}) is None


@pytest.mark.parametrize(("tools", "reason"), [("{not json", "not valid JSON"),
                                               ([1, 2], "list of function definitions"),
                                               (5, "list of function definitions")])
def test_unusable_tools_are_a_reason(tools: Any, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        row_tools({"tools": tools})


# --------------------------------------------------------------------------- B: falsy values


@pytest.mark.parametrize("value", [0, 0.0, False, 1, True, ["x"], {"a": 1}])
@pytest.mark.parametrize(
    ("fmt", "base", "field"),
    [
        ("alpaca", {"instruction": "i", "output": "o"}, "input"),
        ("alpaca", {"instruction": "i", "output": "o"}, "system"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]}, "system"),
        ("fields", {"q": "q", "a": "a"}, "s"),
    ],
)
def test_non_text_values_of_text_fields_are_a_reason_never_dropped(
    fmt: str, base: dict, field: str, value: Any
) -> None:
    fields = FieldMap("q", "a", "s") if fmt == "fields" else FieldMap()
    with pytest.raises(RowError, match=f"{field} must be a string, got {type(value).__name__}"):
        to_messages({**base, field: value}, fmt, fields)


@pytest.mark.parametrize("absent", [{}, {"input": None}, {"input": ""}])
def test_missing_null_and_empty_input_mean_no_input(absent: dict) -> None:
    messages = to_messages({"instruction": "i", "output": "o", **absent}, "alpaca", FieldMap())
    assert messages[0] == {"role": "user", "content": "i"}


def test_text_input_zero_is_kept() -> None:
    messages = to_messages({"instruction": "i", "input": "0", "output": "o"}, "alpaca",
                           FieldMap())
    assert messages[0]["content"] == "i\n\n0"


def test_alpaca_history_becomes_earlier_turns() -> None:
    row = {"instruction": "i2", "output": "o2", "history": [["i1", "o1"]], "system": "s"}
    assert to_messages(row, "alpaca", FieldMap()) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "i1"},
        {"role": "assistant", "content": "o1"}, {"role": "user", "content": "i2"},
        {"role": "assistant", "content": "o2"}]
    with pytest.raises(RowError, match=r"history\[0\]"):
        to_messages({**row, "history": [["only one"]]}, "alpaca", FieldMap())


# --------------------------------------------------------------------------- B: rejection reasons


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "assistant", "content": "Hello!"}],
         "starts with an assistant turn (turn 0), not a user turn"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hello!"}],
         "starts with an assistant turn (turn 1), not a user turn"),
        ([{"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}],
         "starts with a tool turn (turn 0)"),
        ([{"role": "system", "content": "s"}], "only system turns"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
          {"role": "tool", "content": "t"}], "ends on a tool turn"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n"}],
         r"empty assistant response \(turn 1\)"),
    ],
)
def test_conversation_reasons_are_accurate(messages: list, reason: str) -> None:
    with pytest.raises(RowError, match=reason.replace("(", r"\(").replace(")", r"\)")
                       if "\\" not in reason else reason):
        to_messages({"messages": messages}, "messages", FieldMap())


# --------------------------------------------------------------------------- B: encodings


ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]


def _write(path: Path, kind: str, bom: bool, crlf: bool) -> Path:
    newline = "\r\n" if crlf else "\n"
    if kind == "jsonl":
        text = newline.join(json.dumps(r) for r in ROWS) + newline
    elif kind == "json-array":
        text = "[" + newline + ("," + newline).join(json.dumps(r) for r in ROWS) + newline + "]"
    else:
        text = json.dumps({"data": ROWS}, indent=1).replace("\n", newline)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("kind", ["jsonl", "json-array", "json-object"])
def test_every_reader_reads_bom_and_crlf_files_alike(
    tmp_path: Path, kind: str, bom: bool, crlf: bool
) -> None:
    suffix = ".jsonl" if kind == "jsonl" else ".json"
    source = open_source(_write(tmp_path / f"rows{suffix}", kind, bom, crlf))
    rows = source.read(0, len(source))
    assert [r.error for r in rows] == [None] * len(ROWS)
    assert [r.data for r in rows] == ROWS


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_files_are_refused_with_one_line(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode(encoding))
    with pytest.raises(InputError, match=encoding.upper()):
        open_source(path)


# --------------------------------------------------------------------------- C: invalid Unicode


LONE = "\\ud800"  # as JSON writes it
HOSTILE_ROWS = [
    ('{"instruction": "q", "output": "a' + LONE + '"}', "output"),
    ('{"instruction": "q' + LONE + '", "output": "a"}', "instruction"),
    ('{"messages": [{"role": "user", "content": "q"}, '
     '{"role": "assistant", "content": "x' + LONE + 'y"}]}', "messages[1].content"),
    ('{"instruction": "q", "output": "a", "meta": {"tags": ["ok", "' + LONE + '"]}}',
     "meta.tags[1]"),
    ('{"instruction": "q", "output": "a", "k' + LONE + '": 1}', "field name"),
    ('{"id": "id-' + LONE + '", "instruction": "q", "output": "a"}', "id"),
    ('{"id": "x", "instruction": "q", "output": "a", "low": "\\udfff tail"}', "low"),
]


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "json-object", "memory"])
def test_lone_surrogates_are_rejected_per_row_naming_the_field(tmp_path: Path, kind: str) -> None:
    lines = [json.dumps({"id": "good", "instruction": "q", "output": "a"})]
    lines += [line for line, _ in HOSTILE_ROWS]
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n")
        source = open_source(path, id_field="id")
    elif kind == "json-array":
        path = tmp_path / "rows.json"
        path.write_text("[" + ",\n".join(lines) + "]")
        source = open_source(path, id_field="id")
    elif kind == "json-object":
        path = tmp_path / "rows.json"
        path.write_text('{"rows": [' + ",\n".join(lines) + "]}")
        source = open_source(path, id_field="id")
    else:
        source = ListSource([json.loads(line) for line in lines], id_field="id")
    rows = source.read(0, len(source))
    assert rows[0].error is None
    for row, (_, field) in zip(rows[1:], HOSTILE_ROWS, strict=True):
        assert row.data is None and row.error is not None, row
        assert field in row.error and "not valid Unicode" in row.error
        # The side file's record is always writable, the offending id escaped.
        record = json.dumps(rejection(row, row.error), ensure_ascii=False).encode()
        assert b"\\\\ud800" in record or b"\\\\udfff" in record or field != "id"


def test_invalid_text_walks_any_depth_in_linear_time() -> None:
    deep: Any = "\ud800"
    for _ in range(50_000):
        deep = [deep]
    t0 = time.perf_counter()
    assert invalid_text({"a": deep}) == "a" + "[0]" * 50_000
    assert time.perf_counter() - t0 < 5
    assert invalid_text({"a": ["fine", {"b": "ok\u00e9"}]}) is None


def test_lone_surrogates_end_to_end_are_rejected_and_written(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from profit_prep import ScoreConfig, score

    data = tmp_path / "rows.jsonl"
    good = [json.dumps({"id": f"g{i}", "instruction": "q", "output": "a"}) for i in range(2)]
    data.write_text("\n".join(good + [line for line, _ in HOSTILE_ROWS]) + "\n")
    out = tmp_path / "out"
    summary = score(ScoreConfig(data=str(data), out=str(out), model=str(tiny_model_dir),
                                id_field="id", quiet=True, max_length=128))
    assert summary["scored_rows"] == 2 and summary["rejected_rows"] == len(HOSTILE_ROWS)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["example_id"] for r in rejected} >= {"id-\\ud800"}
    assert all("not valid Unicode" in r["reason"] for r in rejected)


def _cli(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_path_that_is_not_utf8_is_refused_up_front(tmp_path: Path) -> None:
    bad = os.fsencode(tmp_path) + b"/rows\xff.jsonl"
    with open(bad, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    out = tmp_path / "out"
    result = _cli("score", "--data", bad, "--out", str(out), cwd=tmp_path)
    assert_one_error_line(result, "is not valid UTF-8")
    assert "\\xff" in result.stderr
    assert not out.exists()
    with pytest.raises(InputError, match="--chat-template path .* is not valid UTF-8"):
        resolve_template(None, os.fsdecode(bad))
    # A folder of Parquet files, one named with a byte that is not UTF-8.
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parts"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/part\xfe.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(ROWS), f)
    with pytest.raises(InputError, match=r"--data file path .*\\xfe.* is not valid UTF-8"):
        open_source(folder)


# --------------------------------------------------------------------------- D: bounded cost


def many_turns(n: int, text: str = "x") -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"q{i} {text}"},
                {"role": "assistant", "content": f"a{i} {text}"}]
    return out


def test_a_row_beyond_what_max_length_could_hold_is_rejected_before_rendering(
    smollm2_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer = Renderer(smollm2_tokenizer, max_length=64)
    bound = rendering.CAP_FACTOR * 64 * renderer.token_bytes
    assert renderer.max_chars == bound and renderer.token_bytes == max(
        len(t.encode()) for t in smollm2_tokenizer.get_vocab())
    # The bound is proven: no token of this vocabulary decodes to more bytes.
    assert max(len(smollm2_tokenizer.convert_tokens_to_string([t]).encode())
               for t in smollm2_tokenizer.get_vocab()) <= renderer.token_bytes
    calls = []
    monkeypatch.setattr(renderer, "_text", lambda *a, **k: calls.append(1) or "")
    huge = ASK + [{"role": "assistant", "content": "y" * (bound + 1)}]
    with pytest.raises(RowError, match="longer than --max-length 64 allows"):
        renderer.render(huge)
    assert not calls  # rejected before any render
    # Many small strings count as much as one long one.
    with pytest.raises(RowError, match="longer than --max-length"):
        renderer.render(many_turns(bound // 4))
    monkeypatch.undo()
    # Below the bound a long row is truncated as before, not rejected.
    ex = Renderer(smollm2_tokenizer, max_length=64).render(
        ASK + [{"role": "assistant", "content": "word " * (bound // 10)}])
    assert ex.truncated and len(ex.input_ids) == 64


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen_default_system", "plain"])
def test_one_pass_spans_equal_turn_by_turn_spans(
    smollm2_tokenizer: Any, name: str, data: st.DataObject
) -> None:
    """The oracle is the definition (two renders a turn): with more than PREFIX_TURNS answers
    the one-pass spans, ids and mask must be exactly what it gives."""
    template = {"smollm2": None, "llama3": (FIXTURES / "llama3.jinja").read_text(),
                "qwen_default_system": (FIXTURES / "qwen_default_system.jinja").read_text(),
                "plain": PLAIN_TEMPLATE}[name]
    messages = [{"role": "system", "content": data.draw(TEXT)}] if data.draw(st.booleans()) else []
    for _ in range(data.draw(st.integers(rendering.PREFIX_TURNS + 1, rendering.PREFIX_TURNS + 5))):
        messages.append({"role": "user", "content": data.draw(TEXT)})
        if data.draw(st.booleans()):
            messages += [{"role": "assistant", "content": data.draw(TEXT)},
                         {"role": "tool", "content": data.draw(TEXT)}]
        messages.append({"role": "assistant", "content": data.draw(TEXT)})
    renderer = Renderer(smollm2_tokenizer, template, max_length=100_000)
    full, spans = renderer.response_spans(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(turns) > rendering.PREFIX_TURNS
    exact = [renderer._strip(full, *renderer._prefix_span(messages, None, full, i))
             for i in turns]
    assert spans == exact
    one_pass = renderer.render(messages)
    try:
        rendering.PREFIX_TURNS = 10**9
        by_turn = renderer.render(messages)
    finally:
        rendering.PREFIX_TURNS = 8
    assert one_pass.input_ids.tolist() == by_turn.input_ids.tolist()
    assert one_pass.response_mask.tolist() == by_turn.response_mask.tolist()


def test_a_template_that_rewrites_turns_is_rejected_in_one_pass(smollm2_tokenizer: Any) -> None:
    """Answers after the last user turn get a think block, earlier ones do not: the first and
    last answers disagree, so the row is rejected rather than guessed."""
    template = (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
        "loop.index0 > ns.last %}<think></think>{% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RowError, match="cannot be located"):
        Renderer(smollm2_tokenizer, template, max_length=100_000).render(many_turns(12))


def _render_seconds(renderer: Renderer, messages: list) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        renderer.render(messages)
        best = min(best, time.perf_counter() - t0)
    return best


def test_render_time_is_linear_in_the_turns(smollm2_tokenizer: Any) -> None:
    renderer = Renderer(smollm2_tokenizer, max_length=200_000)
    small, large = _render_seconds(renderer, many_turns(1000)), _render_seconds(
        renderer, many_turns(4000))
    # Linear: ~4x; quadratic (the per-turn prefixes, or one mask pass a span) would be ~16x.
    assert large / small < 9, (small, large)
    t0 = time.perf_counter()
    ex = renderer.render(many_turns(10_000))
    assert time.perf_counter() - t0 < 15
    assert int(ex.response_mask.sum()) > 10_000 * 3


# --------------------------------------------------------------------------- F: up-front checks


def _template_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.jinja"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
        ("{% for m in messages %}\n{% if m %}{{ m.content }}{% endfor %}", "syntax error at line"),
        ("{{ raise_exception('this template refuses everything') }}",
         "this template refuses everything on every row tried"),
        ("{{ messages[0].nope.deeper }}", "chat template failed"),
    ],
)
def test_a_broken_template_is_one_error_before_scoring(
    tmp_path: Path, tiny_model_dir: Path, template: str, message: str
) -> None:
    from profit_prep import ScoreConfig, score

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        score(ScoreConfig(data=str(data), out=str(out), model=str(tiny_model_dir), quiet=True,
                          chat_template=str(_template_file(tmp_path, template))))
    assert not (out / "data").exists() or not any((out / "data").iterdir())


@pytest.mark.parametrize("text", ["", "  \n\t\n"])
def test_an_empty_template_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(InputError, match="is empty; omit --chat-template"):
        resolve_template(None, _template_file(tmp_path, text))


def test_a_template_folder_or_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a file"):
        resolve_template(None, tmp_path)
    with pytest.raises(InputError, match="not found"):
        resolve_template(None, tmp_path / "none.jinja")


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    os.mkfifo(path)
    return path


def _socket(tmp_path: Path) -> Path:
    path = tmp_path / "rows.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return path


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def _dir_without_data(tmp_path: Path) -> Path:
    path = tmp_path / "notes"
    path.mkdir()
    (path / "README.md").write_text("no rows here")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_fifo, "is a FIFO (named pipe), not a data file"),
        (_socket, "is a socket, not a data file"),
        (lambda _: Path("/dev/null"), "is a character device, not a data file"),
        (_empty_dir, "an empty folder, not a dataset"),
        (_dir_without_data, "no .parquet files and no dataset saved with save_to_disk"),
        (lambda p: p / "missing.jsonl", "missing.jsonl: no such file"),
        (lambda p: p / "missing" / "train.parquet", "train.parquet: no such file"),
    ],
)
def test_a_data_path_that_holds_no_rows_is_one_accurate_line_at_once(
    tmp_path: Path, make: Any, message: str
) -> None:
    path = make(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_source(path)
    assert time.perf_counter() - t0 < 5  # no hub attempt, no blocking open


def test_a_fifo_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    result = _cli("score", "--data", str(_fifo(tmp_path)), "--out", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert_one_error_line(result, "is a FIFO (named pipe), not a data file")


def test_spans_and_masks_hold_for_the_demo_shape_after_the_mask_rewrite(
    smollm2_tokenizer: Any,
) -> None:
    """The one-search-a-token mask equals the old one-pass-a-span mask on real offsets."""
    ex = Renderer(smollm2_tokenizer).render(TOOL_TURNS[:1] + [
        {"role": "assistant", "content": "a\n\nb"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": " d "}])
    full, spans = Renderer(smollm2_tokenizer).response_spans(TOOL_TURNS[:1] + [
        {"role": "assistant", "content": "a\n\nb"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": " d "}])
    enc = smollm2_tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    old = np.zeros(len(offsets), bool)
    for s, e in spans:
        old |= ((ends > s) & (starts < e)) | ((starts == ends) & (starts >= s) & (starts < e))
    assert ex.response_mask.tolist() == old.tolist()


def test_escaped_surrogate_pairs_are_valid_text(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "q\\ud83d\\ude00", "output": "a\\u00e9"}\n')
    (row,) = open_source(path).read(0, 1)
    assert row.error is None and row.data == {"instruction": "q\U0001f600", "output": "a\u00e9"}


def test_a_field_rendered_for_one_turn_only_is_named_for_the_turn_that_loses_it(
    smollm2_tokenizer: Any,
) -> None:
    """A template that renders the field of the first answer only: the last one's would vanish
    (removing the field from every message changes the text, so each holder is checked)."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.index0 == 1 and m.thinking %}"
        "{{ m.thinking }}\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "thinking": "t1"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d", "thinking": "t2"}]
    with pytest.raises(RowError, match="ignores the 'thinking' field of message 3"):
        Renderer(smollm2_tokenizer, template).render(messages)
    ex = Renderer(smollm2_tokenizer, template).render(messages[:2])  # rendered: fine
    assert "t1" in smollm2_tokenizer.decode(ex.input_ids)


def test_parquet_strings_that_are_not_utf8_are_rejected_per_row(
    tmp_path: Path, private_datasets_cache: None
) -> None:
    """Parquet does not check its strings: a row holding bytes that are not UTF-8 is rejected
    naming the column, the others read as always (ids too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(values: list[bytes]) -> pa.Array:
        offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
        return pa.Array.from_buffers(pa.string(), len(values),
                                     [None, pa.py_buffer(offsets.tobytes()),
                                      pa.py_buffer(b"".join(values))])

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": strings([b"a", b"b\xff", b"c"]),
                             "instruction": strings([b"q", b"q", b"q\xfe"]),
                             "output": pa.array(["o", "o", "o"])}), path)
    source = open_source(path, id_field="id")
    rows = source.read(0, 3)
    assert rows[0].error is None and rows[0].data["id"] == "a"
    assert rows[1].error == "id is not valid UTF-8"
    assert rows[2].error == "instruction is not valid UTF-8"
    hashes, valid = source.id_hashes(3)
    assert valid.tolist() == [True, False, False]
