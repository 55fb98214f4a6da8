"""ms-swift rows: a token mask as whole messages with ``"loss": true/false``.

ms-swift takes no token-level input: it renders ``messages`` with its own template and trains on
an assistant message when its ``loss`` is true. A ProFit mask is written exactly by splitting each
assistant turn into consecutive assistant messages at the mask's boundaries, which is exact only
where every piece, tokenised on its own, gives the very ids it had in the scored row. A row where
that fails (a boundary inside a merge, a truncated row, a source row changed since scoring) is
refused with the reason, never approximated. The conversation's other messages come from the
scored input file (the manifest's ``input``), read the way scoring read it.

The template's own end (its suffix, trained whole) is replaced by the final turn's end-of-turn
tokens and the row's tail as pieces with their own ``loss`` and the row's ``"add_eos": false``,
so ms-swift's labels are the mask on every token (tests/test_trainers.py encodes with its own
loader and template). What it cannot express is refused: an end of turn masked right after a
trained token, and a middle turn whose end (its ``chat_sep``) is kept or follows a kept token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError, RowError
from profit_prep.inputs.formats import FieldMap, detect_row_format, to_messages
from profit_prep.inputs.sources import open_source
from profit_prep.rendering.renderer import load_tokenizer


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


def _pieces(ctx: _Context, ids: np.ndarray, keep: np.ndarray, turn: int
            ) -> list[dict[str, Any]]:
    """ids as assistant messages split where keep changes; each piece must re-tokenise to its
    own ids (RowError otherwise: a mask boundary inside a merge)."""
    pieces = []
    bounds = np.flatnonzero(np.diff(keep.astype(np.int8))) + 1
    for s, e in zip([0, *bounds.tolist()], [*bounds.tolist(), len(ids)]):
        piece = ids[s:e].tolist()
        if not piece:
            continue
        text = ctx.tokenizer.decode(piece)
        if ctx.encode(text) != piece:
            raise RowError(f"assistant turn {turn}: the piece {json.dumps(text)[:60]} re-tokenises "
                           "to other ids than it has in the row (a mask boundary inside a merge)")
        pieces.append({"role": "assistant", "content": text, "loss": bool(keep[s])})
    return pieces


def _n_eot(ctx: _Context, ids: np.ndarray) -> int:
    """How many end-of-turn ids close the turn's run."""
    n = 0
    while n < len(ids) and int(ids[len(ids) - 1 - n]) in ctx.eot:
        n += 1
    return n


def _turn(ctx: _Context, ids: np.ndarray, keep: np.ndarray, turn: int) -> list[dict[str, Any]]:
    """One assistant turn's run (content + end-of-turn tokens): its content as assistant messages.

    ms-swift 4.6.0's ``Template._add_dynamic_eos`` (swift/template/base.py) trains any untrained
    run that starts with the template's suffix ids (chatml: ``<|im_end|>\n``) right after a
    trained token, whatever the messages say: an end of turn masked right after a trained token
    cannot be written, and is refused.
    """
    n_eot = _n_eot(ctx, ids)
    n_content = len(ids) - n_eot
    if n_eot and not keep[n_content:].all() and n_content and keep[n_content - 1]:
        raise RowError(f"assistant turn {turn}: its end-of-turn token is masked right after a "
                       "trained token, and ms-swift then trains the end of turn "
                       "(Template._add_dynamic_eos); export with protect end_of_turn")
    return (_pieces(ctx, ids[:n_content], keep[:n_content], turn)
            or [{"role": "assistant", "content": "", "loss": False}])


def _final_end(ctx: _Context, ids: np.ndarray, keep: np.ndarray, tail: np.ndarray, turn: int
               ) -> list[dict[str, Any]]:
    """The final turn's end-of-turn tokens and what follows them in the row (chatml: the
    newline, outside the response) as messages of their own, with the row's ``"add_eos": false``
    in place of the template's suffix, which ms-swift would train whole (a SUFFIX context)."""
    n_eot = _n_eot(ctx, ids)
    end = _pieces(ctx, ids[len(ids) - n_eot:], keep[len(ids) - n_eot:], turn)
    return end + _pieces(ctx, tail, np.zeros(len(tail), bool), turn)


def _middle_end(ids: np.ndarray, keep: np.ndarray, n_eot: int, turn: int) -> None:
    """A middle turn's end is ms-swift's ``chat_sep`` (chatml ``<|im_end|>\n``): untrained, and
    trained whole by ``_add_dynamic_eos`` when the token before it is; the newline after it is
    never in a mask, so only an untrained end after an untrained token is exact."""
    n_content = len(ids) - n_eot
    if n_eot and (keep[n_content:].any() or (n_content and keep[n_content - 1])):
        raise RowError(f"assistant turn {turn} is not the last: ms-swift writes its end itself "
                       "and trains it, with the newline after it, exactly when the token before "
                       "it is trained, which this mask is not")


def row_messages(ctx: _Context, example_id: str, ids: np.ndarray, keep: np.ndarray,
                 response: np.ndarray) -> list[dict[str, Any]]:
    """The row's conversation with its assistant turns split at the mask (RowError if not exact)."""
    messages = ctx.messages(example_id)
    runs = _runs(response)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(turns) != len(runs):
        raise RowError(f"{len(turns)} assistant turns in the source row but {len(runs)} response "
                       "spans in the scored row")
    if not turns or turns[-1] != len(messages) - 1:
        raise RowError("the conversation does not end with an assistant turn")
    result: list[dict[str, Any]] = []
    by_turn = dict(zip(turns, runs))
    for i, message in enumerate(messages):
        if i not in by_turn:
            result.append({"role": message["role"], "content": message["content"]})
            continue
        s, e = by_turn[i]
        turn = len([t for t in turns if t <= i])
        result += _turn(ctx, ids[s:e], keep[s:e], turn)
        if i == turns[-1]:
            result += _final_end(ctx, ids[s:e], keep[s:e], ids[e:], turn)
        else:
            _middle_end(ids[s:e], keep[s:e], _n_eot(ctx, ids[s:e]), turn)
    return result


def build(out: Path, manifest: dict[str, Any], example_ids: list[str], ids: list[np.ndarray],
          keep: list[np.ndarray], response: list[np.ndarray]
          ) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    """(records, refused rows with reasons, exported example ids) for the given rows."""
    ctx = _Context(out, manifest)
    records, refused, exported = [], [], []
    for e, i, k, r in zip(example_ids, ids, keep, response):
        try:
            records.append({"messages": row_messages(ctx, e, i, k, r), "add_eos": False})
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
        for k, ((s, e), turn) in enumerate(zip(spans, turns)):
            got, lab = [], []
            for m in turn:
                piece = ctx.encode(m["content"])
                got += piece
                lab += piece if m["loss"] else [-100] * len(piece)
            if k < len(spans) - 1:
                # a middle turn's end is ms-swift's chat_sep, untrained (other rows are refused)
                n_eot = 0
                while n_eot < e - s and int(scored[e - 1 - n_eot]) in ctx.eot:
                    n_eot += 1
                got += scored[e - n_eot:e].tolist()
                lab += [-100] * n_eot
            else:
                e = len(scored)  # the final turn's pieces run to the row's end (add_eos false)
            if len(got) != e - s or record.get("add_eos") is not False:
                ids[s:e] = -1  # a different length or a template suffix: the ids check reports it
                continue
            ids[s:e], labels[s:e] = got, lab
        result[name] = (ids, labels)
    return result


# ms-swift's dataset loader keeps only its standard columns unless told otherwise
# (swift/dataset/loader.py: RowPreprocessor.remove_useless_columns); each row's "add_eos": false
# must reach the template, so the CLI line keeps the columns.
SFT_FLAGS = ("--remove_unused_columns", "false")


def script(model: str, dataset: str) -> str:
    """ms-swift.sh: the ``swift sft`` line that trains on the exported rows exactly."""
    return (
        "# written by profit-prep export: assistant turns split at the mask's boundaries, each\n"
        "# piece with \"loss\": true/false (exact: every piece re-tokenises to its own ids); the\n"
        "# final turn carries its end of turn and \"add_eos\": false (kept by the flag below)\n"
        f"swift sft --model {json.dumps(model)} --tuner_type full \\\n"
        f"    --dataset {json.dumps(dataset)} {' '.join(SFT_FLAGS)} \\\n"
        "    --model_type MODEL_TYPE --template TEMPLATE  # a local model needs both\n")
