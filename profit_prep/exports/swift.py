"""ms-swift rows: a token mask as whole messages with ``"loss": true/false``.

ms-swift takes no token-level input: it renders ``messages`` with its own template and trains on
an assistant message when its ``loss`` is true. A ProFit mask is written exactly by splitting each
assistant turn into consecutive assistant messages at the mask's boundaries, which is exact only
where every piece, tokenised on its own, gives the very ids it had in the scored row. A row where
that fails (a boundary inside a merge, a truncated row, a source row changed since scoring) is
refused with the reason, never approximated. The conversation's other messages come from the
scored input file (the manifest's ``input``), read the way scoring read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError, RowError
from profit_prep.reading import FieldMap, detect_row_format, to_messages
from profit_prep.rendering import load_tokenizer
from profit_prep.sources import open_source


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


class _Context:
    """The scoring tokenizer and the input rows, opened once per export."""

    def __init__(self, out: Path, manifest: dict[str, Any]) -> None:
        self.tokenizer = load_tokenizer(manifest["tokenizer"]["path"])
        self.default_system = _default_system(self.tokenizer,
                                              (manifest.get("chat_template") or {}).get("text"))
        self.eot = [int(i) for i in (manifest.get("render") or {}).get("end_of_turn_ids") or []]
        render = manifest.get("render") or {}
        self.fmt = render.get("format", "auto")
        self.fields = FieldMap(**{k: render.get(k) for k in FieldMap.__dataclass_fields__})
        data = (manifest.get("input") or {}).get("path")
        if not data:
            raise InputError(f"{out}: the manifest names no input file; ms-swift rows need the "
                             "scored conversations")
        try:
            self.source = open_source(data, id_field=self.fields.id_field)
        except InputError as exc:
            raise InputError(f"ms-swift rows need the scored input file: {exc}") from None
        table = pa.concat_tables(
            pq.read_table(out / s["file"], columns=["example_id", "source_index", "truncated"])
            for s in manifest["shards"]
        ) if manifest["shards"] else None
        self.index: dict[str, tuple[int, bool]] = {} if table is None else {
            e: (i, t) for e, i, t in zip(table["example_id"].to_pylist(),
                                         table["source_index"].to_pylist(),
                                         table["truncated"].to_pylist())
        }

    def messages(self, example_id: str) -> list[dict[str, Any]]:
        index, truncated = self.index[example_id]
        if truncated:
            raise RowError("truncated at scoring: ms-swift would train on the whole conversation")
        rows = self.source.read(index, index + 1)
        if not rows or rows[0].data is None or rows[0].example_id != example_id:
            raise RowError(f"source row {index} is not the scored row any more")
        data = rows[0].data
        fmt = detect_row_format(data, self.fields) if self.fmt == "auto" else self.fmt
        messages = to_messages(data, fmt, self.fields)
        if self.default_system is not None and messages[0]["role"] != "system":
            # The scoring template added this system turn itself; ms-swift's template may not.
            messages.insert(0, {"role": "system", "content": self.default_system})
        return messages

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _default_system(tokenizer: Any, template: str | None) -> str | None:
    """The system message the chat template adds when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."), found by rendering with a marker."""
    if not template:
        return None
    marker, user = "\x1fPROFIT_PREP_SYSTEM\x1f", [{"role": "user", "content": "x"}]

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)

    try:
        with_marker, plain = render([{"role": "system", "content": marker}, *user]), render(user)
    except Exception:  # noqa: BLE001 - a template that refuses a system turn has no default
        return None
    if marker not in with_marker:
        return None
    before, after = with_marker.split(marker, 1)
    if plain == with_marker.replace(marker, "") or not plain.startswith(before):
        return None
    rest = plain[len(before):]
    tail = after[: after.find("x")] if "x" in after else after
    end = rest.find(tail) if tail else -1
    return rest[:end] if end > 0 else None


def _turn(ctx: _Context, ids: np.ndarray, keep: np.ndarray, turn: int) -> list[dict[str, Any]]:
    """One assistant turn's run (content + end-of-turn tokens) as assistant messages."""
    n_eot = 0
    while n_eot < len(ids) and int(ids[len(ids) - 1 - n_eot]) in ctx.eot:
        n_eot += 1
    content, content_keep = ids[:len(ids) - n_eot], keep[:len(ids) - n_eot]
    eot_keep = keep[len(ids) - n_eot:]
    if n_eot and not eot_keep.all():
        # ms-swift's template trains a turn's end (its suffix) whatever the messages say
        raise RowError(f"assistant turn {turn}: its end-of-turn token is masked, which ms-swift "
                       "cannot express (it always trains the turn's end); export with protect "
                       "end_of_turn")
    pieces = []
    bounds = np.flatnonzero(np.diff(content_keep.astype(np.int8))) + 1
    for s, e in zip([0, *bounds.tolist()], [*bounds.tolist(), len(content)]):
        piece = content[s:e].tolist()
        text = ctx.tokenizer.decode(piece)
        if ctx.encode(text) != piece:
            raise RowError(f"assistant turn {turn}: the piece {json.dumps(text)[:60]} re-tokenises "
                           "to other ids than it has in the row (a mask boundary inside a merge)")
        pieces.append({"role": "assistant", "content": text, "loss": bool(content_keep[s])})
    if not pieces:
        pieces.append({"role": "assistant", "content": "", "loss": False})
    return pieces


def row_messages(ctx: _Context, example_id: str, ids: np.ndarray, keep: np.ndarray,
                 response: np.ndarray) -> list[dict[str, Any]]:
    """The row's conversation with its assistant turns split at the mask (RowError if not exact)."""
    messages = ctx.messages(example_id)
    runs = _runs(response)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(turns) != len(runs):
        raise RowError(f"{len(turns)} assistant turns in the source row but {len(runs)} response "
                       "spans in the scored row")
    result: list[dict[str, Any]] = []
    by_turn = dict(zip(turns, runs))
    for i, message in enumerate(messages):
        if i not in by_turn:
            result.append({"role": message["role"], "content": message["content"]})
            continue
        s, e = by_turn[i]
        result += _turn(ctx, ids[s:e], keep[s:e], len([t for t in turns if t <= i]))
    return result


def build(out: Path, manifest: dict[str, Any], example_ids: list[str], ids: list[np.ndarray],
          keep: list[np.ndarray], response: list[np.ndarray]
          ) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    """(records, refused rows with reasons, exported example ids) for the given rows."""
    ctx = _Context(out, manifest)
    records, refused, exported = [], [], []
    for e, i, k, r in zip(example_ids, ids, keep, response):
        try:
            records.append({"messages": row_messages(ctx, e, i, k, r)})
            exported.append(e)
        except RowError as exc:
            refused.append({"example_id": e, "reason": str(exc)})
    return records, refused, exported


def read_back(jsonl: Path, out: Path, manifest: dict[str, Any],
              names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of each exported row's response spans as the written messages give them.

    Every assistant message is tokenised on its own (how ms-swift's template encodes content);
    the spans are laid back over the scored row, so the check compares them with its ids and
    mask. Positions outside the response spans carry the scored ids and -100.
    """
    ctx = _Context(out, manifest)
    shards = {}
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"], columns=["example_id", "input_ids",
                                                            "response_mask"])
        for e, i, r in zip(table["example_id"].to_pylist(), table["input_ids"].to_pylist(),
                           table["response_mask"].to_pylist()):
            shards[e] = (np.asarray(i, np.int64), np.asarray(r, bool))
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    if len(records) != len(names):
        raise InputError(f"{jsonl}: {len(records)} rows, the export record names {len(names)}")
    result = {}
    for name, record in zip(names, records):
        scored, response = shards[name]
        ids, labels = scored.copy(), np.full(len(scored), -100, np.int64)
        turns: list[list[dict[str, Any]]] = []
        current: list[dict[str, Any]] = []
        for m in record["messages"]:
            if m["role"] == "assistant":
                current.append(m)
            elif current:
                turns.append(current)
                current = []
        if current:
            turns.append(current)
        spans = _runs(response)
        if len(turns) != len(spans):
            result[name] = (np.empty(0, np.int64), np.empty(0, np.int64))
            continue
        for (s, e), turn in zip(spans, turns):
            got, lab = [], []
            for m in turn:
                piece = ctx.encode(m["content"])
                got += piece
                lab += piece if m["loss"] else [-100] * len(piece)
            n_eot = 0
            while n_eot < e - s and int(scored[e - 1 - n_eot]) in ctx.eot:
                n_eot += 1
            eot = scored[e - n_eot:e].tolist()
            got += eot
            lab += eot  # ms-swift always trains the turn's end (rows masking it are refused)
            if len(got) != e - s:
                ids[s:e] = -1  # a different length: the ids check reports the row
                continue
            ids[s:e], labels[s:e] = got, lab
        result[name] = (ids, labels)
    return result
