"""profit_prep.training.exports: each trainer's container read back independently, the check, DEST
safety.

Rows are scored by the tiny random model; a ``random`` rule (keep_fraction 0.5) puts mask
boundaries everywhere. The oracle recomputes the kept tokens from the shard with
``profit_prep.rules.profit.keep_flat`` (the rule's own definition), not from the exporter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from profit_prep.errors import InputError, RowError
from profit_prep.training.exports import EXPORT_MANIFEST, FORMATS, check_export, export
from tests.conftest import REPO, score_demo

RULE = {"strategy": "random", "keep_fraction": 0.5, "seed": 3}


@pytest.fixture(scope="module")
def out(tmp_path_factory, tiny_model_dir: Path) -> Path:
    return score_demo(tmp_path_factory.mktemp("export") / "out", tiny_model_dir, limit=6)


def oracle(out: Path, protect: bool = True, **rule: object
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """example_id -> (ids, kept) from the shards and the rule's definition."""
    from profit_prep.rules.profit import MaskRule, keep_flat

    manifest = json.loads((out / "manifest.json").read_text())
    eot = manifest["render"]["end_of_turn_ids"]
    rows = {}
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        for name, ids, resp, lp in zip(*(table[c].to_pylist() for c in
                                         ("example_id", "input_ids", "response_mask",
                                          "logprobs"))):
            ids, resp = np.array(ids), np.array(resp, bool)
            keep = keep_flat(np.array(lp), MaskRule(**{**RULE, **rule}),
                             lengths=np.array([len(ids)]), example_ids=[name])
            rows[name] = (ids, resp & (keep | (protect & np.isin(ids, eot))))
    return rows


def read_labels(dest: Path, to: str) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """(column names, input_ids, labels) as the trainer would read the container."""
    if to == "llamafactory":
        table = datasets.load_from_disk(str(dest / "tokenized"))["train"].data.table
    elif to in ("hf", "trl"):
        table = datasets.load_from_disk(str(dest / "dataset")).data.table
    else:
        table = pq.read_table(next(dest.glob("data-*.parquet")))
    ids = table["input_ids"].to_pylist()
    if to == "trl":
        masks = table["completion_mask"].to_pylist()
        labels = [[i if m else -100 for i, m in zip(r, k)] for r, k in zip(ids, masks)]
    else:
        labels = table["labels"].to_pylist()
    return table.column_names, ids, labels


COLUMNS = {
    "llamafactory": ["input_ids", "attention_mask", "labels"],
    "axolotl": ["input_ids", "attention_mask", "labels"],
    "hf": ["input_ids", "attention_mask", "labels"],
    "trl": ["input_ids", "completion_mask"],
}


@pytest.mark.parametrize("to", ["llamafactory", "axolotl", "hf", "trl"])
def test_each_container_holds_exactly_the_rule_labels(out, tmp_path, to, private_datasets_cache):
    dest = tmp_path / to
    summary = export(out, dest, to, **RULE)
    columns, ids, labels = read_labels(dest, to)
    assert columns == COLUMNS[to]
    want = oracle(out)
    assert len(ids) == len(want) == summary.rows
    for (name, (oids, keep)), row_ids, row_labels in zip(want.items(), ids, labels):
        assert row_ids == oids.tolist(), name
        assert row_labels == np.where(keep, oids, -100).tolist(), name
    assert summary.trained_tokens == sum(int(k.sum()) for _, k in want.values())
    assert f"{summary.trained_tokens:,} of" in summary.line()
    assert check_export(dest) == []


def test_config_snippets_point_at_the_written_data(out, tmp_path, private_datasets_cache):
    lf = yaml.safe_load((export(out, tmp_path / "lf", "llamafactory").dest /
                         "llamafactory.yaml").read_text())
    assert Path(lf["tokenized_path"]) == tmp_path / "lf" / "tokenized"
    # no dataset_info.json where LLaMA-Factory would look: a vanished tokenized_path fails
    assert not (Path(lf["dataset_dir"]) / "dataset_info.json").exists()
    assert lf["cutoff_len"] >= max(len(i) for i, _ in oracle(out).values())
    assert isinstance(lf["learning_rate"], float) and lf["do_train"] is True
    ax = yaml.safe_load((export(out, tmp_path / "ax", "axolotl").dest /
                         "axolotl.yaml").read_text())
    (entry,) = ax["datasets"]
    assert Path(entry["path"]).is_file() and "type" not in entry
    assert ax["sample_packing"] is False and isinstance(ax["learning_rate"], float)
    export(out, tmp_path / "sw", "ms-swift")
    line = (tmp_path / "sw" / "ms-swift.sh").read_text()
    assert str(next((tmp_path / "sw").glob("data-*.jsonl"))) in line


def test_axolotl_file_name_follows_content(out, tmp_path, private_datasets_cache):
    """axolotl caches prepared data by config: a regenerated export must change the config."""
    dest = tmp_path / "ax"
    export(out, dest, "axolotl", **RULE)
    first = next(dest.glob("data-*.parquet")).name
    export(out, dest, "axolotl", **RULE, overwrite=True)
    assert next(dest.glob("data-*.parquet")).name == first  # same content, same name
    export(out, dest, "axolotl", **{**RULE, "seed": 4}, overwrite=True)
    (again,) = dest.glob("data-*.parquet")
    assert again.name != first
    assert str(again) in (dest / "axolotl.yaml").read_text()


def test_ms_swift_pieces_rebuild_the_scored_tokens(out, tmp_path, smollm2_tokenizer,
                                                   private_datasets_cache):
    dest = tmp_path / "sw"
    summary = export(out, dest, "ms-swift", **RULE)
    want = oracle(out)
    records = [json.loads(x) for x in next(dest.glob("data-*.jsonl")).read_text().splitlines()]
    assert len(records) + len(summary.refused) == len(want)
    refused = {r["example_id"] for r in summary.refused}
    for (name, (ids, keep)), record in zip([w for w in want.items() if w[0] not in refused],
                                           records):
        assistant = [m for m in record["messages"] if m["role"] == "assistant"]
        pieces = [smollm2_tokenizer(m["content"], add_special_tokens=False)["input_ids"]
                  for m in assistant]
        # every kept token, the end of turn included (the final turn carries it, in place of
        # the template's suffix); the assistant pieces run to the row's end
        trained = [t for p, m in zip(pieces, assistant) if m["loss"] for t in p]
        assert trained == ids[keep].tolist(), name
        assert [t for p in pieces for t in p] == ids[-len(sum(pieces, [])):].tolist(), name
        assert all(set(m) == {"role", "content", "loss"} for m in assistant)
        assert record["add_eos"] is False
    assert check_export(dest) == []


def _ctx(tokenizer) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        tokenizer=tokenizer, eot=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", ["Natalia sold 48/2 = 24 clips.", "café au lait ☕ naïve",
                                  "日本語のテキスト", "  spaces\n\nand newlines  "])
def test_ms_swift_split_is_exact_or_refused(smollm2_tokenizer, text):
    """Every boundary position: the pieces re-tokenise to the row's ids, or the row is refused."""
    from profit_prep.training.exports.swift import _turn

    ctx = _ctx(smollm2_tokenizer)
    ids = np.array(ctx.encode(text) + ctx.eot)
    refused = 0
    for cut in range(1, len(ids) - 1):
        keep = np.zeros(len(ids), bool)
        keep[cut:] = True
        try:
            messages = _turn(ctx, ids, keep, 1)
        except RowError as exc:
            assert "re-tokenises" in str(exc)
            refused += 1
            continue
        got = [t for m in messages for t in ctx.encode(m["content"])]
        assert got == ids[:-1].tolist()
        assert "".join(m["content"] for m in messages) == text
    if not text.isascii():
        assert refused > 0  # a cut inside a multi-byte character cannot be written as text


def test_ms_swift_refuses_a_masked_end_of_turn(smollm2_tokenizer):
    """ms-swift trains an untrained end of turn right after a trained token
    (Template._add_dynamic_eos): such a mask is refused."""
    from profit_prep.training.exports.swift import _turn

    ctx = _ctx(smollm2_tokenizer)
    ids = np.array(ctx.encode("It is 4.") + ctx.eot)
    keep = np.ones(len(ids), bool)
    keep[-1] = False
    with pytest.raises(RowError, match="end-of-turn token is masked"):
        _turn(ctx, ids, keep, 1)
    keep[:] = False
    keep[-1] = True  # only the end of turn trained: one untrained message (the end comes after)
    assert _turn(ctx, ids, keep, 1) == [{"role": "assistant", "content": "It is 4.",
                                         "loss": False}]


@pytest.mark.parametrize("before,end,final,ok", [
    (True, True, True, True), (False, True, True, True), (False, False, True, True),
    (True, False, True, False),  # _add_dynamic_eos would train the masked end
    (False, False, False, True), (True, False, False, False), (False, True, False, False),
    (True, True, False, False),  # a middle turn's chat_sep: trained with its newline, or not
])
def test_ms_swift_end_of_turn_table(smollm2_tokenizer, before, end, final, ok):
    """An end of turn is written exactly where ms-swift can train it as the mask says, else the
    row is refused; the final turn carries its end and the row's tail as messages."""
    from profit_prep.training.exports.swift import _final_end, _middle_end, _n_eot, _turn

    ctx = _ctx(smollm2_tokenizer)
    content = ctx.encode("It is 4.")
    ids = np.array(content + ctx.eot)
    keep = np.array([True] * (len(content) - 1) + [before, end])
    tail = np.array(ctx.encode("\n"))
    try:
        messages = _turn(ctx, ids, keep, 1)
        if final:
            messages += _final_end(ctx, ids, keep, tail, 1)
        else:
            _middle_end(ids, keep, _n_eot(ctx, ids), 1)
    except RowError:
        assert not ok
        return
    assert ok
    pieces = [ctx.encode(m["content"]) for m in messages]
    assert sum(pieces, []) == (ids.tolist() + tail.tolist() if final else content)
    labels = [t if m["loss"] else -100 for p, m in zip(pieces, messages) for t in p]
    want = np.where(keep, ids, -100).tolist()
    assert labels == (want + [-100] * len(tail) if final else want[:-1])


def test_check_finds_wrong_labels_the_record_does_not_hide(out, tmp_path, private_datasets_cache):
    import pyarrow as pa

    from profit_prep.store.safe_files import sha256_file

    dest = tmp_path / "ax"
    export(out, dest, "axolotl", **RULE)
    data = next(dest.glob("data-*.parquet"))
    table = pq.read_table(data)
    ids = table["input_ids"].to_pylist()
    shifted = [r[1:] + [-100] for r in ids]  # labels shifted as a causal trainer must NOT get
    pq.write_table(table.set_column(2, "labels", pa.array(shifted, table["labels"].type)), data)
    assert any("changed since the export" in p for p in check_export(dest))
    record = json.loads((dest / EXPORT_MANIFEST).read_text())
    record["files"][data.name] = sha256_file(data)  # a faulty exporter would record it as is
    (dest / EXPORT_MANIFEST).write_text(json.dumps(record))
    problems = check_export(dest)
    assert problems and all("labels are not the ids" in p for p in problems)
    # prompt tokens trained: labels = ids everywhere
    pq.write_table(table.set_column(2, "labels", table["input_ids"]), data)
    record["files"][data.name] = sha256_file(data)
    (dest / EXPORT_MANIFEST).write_text(json.dumps(record))
    assert any("non-response" in p for p in check_export(dest))


def test_check_reports_unprotected_end_of_turn(out, tmp_path, private_datasets_cache):
    import pyarrow as pa

    from profit_prep.store.safe_files import sha256_file

    dest = tmp_path / "ax"
    export(out, dest, "axolotl", **RULE)
    data = next(dest.glob("data-*.parquet"))
    table = pq.read_table(data)
    eot = json.loads((out / "manifest.json").read_text())["render"]["end_of_turn_ids"]
    labels = [[-100 if i in eot else lab for i, lab in zip(r, ls)]
              for r, ls in zip(table["input_ids"].to_pylist(), table["labels"].to_pylist())]
    pq.write_table(table.set_column(2, "labels", pa.array(labels, table["labels"].type)), data)
    record = json.loads((dest / EXPORT_MANIFEST).read_text())
    record["files"][data.name] = sha256_file(data)
    (dest / EXPORT_MANIFEST).write_text(json.dumps(record))
    assert any("end-of-turn tokens not trained though protected" in p for p in check_export(dest))


def test_rows_with_no_trained_token_are_left_out_and_reported(out, tmp_path,
                                                              private_datasets_cache):
    rule = {"keep_fraction": 0.01}
    seed, empty = next((s, e) for s in range(100) for e in [
        [n for n, (_, k) in oracle(out, False, seed=s, **rule).items() if not k.any()]]
        if 0 < len(e) < len(oracle(out)))
    dest = tmp_path / "hf"
    summary = export(out, dest, "hf", strategy="random", seed=seed, protect="none", **rule)
    assert summary.empty_rows == empty and summary.rows == len(oracle(out)) - len(empty)
    assert f"{len(empty)} rows with no trained token left out" in summary.line()
    problems = check_export(dest)
    assert problems == [f"row {e}: has no trained token" for e in empty]
    with pytest.raises(InputError, match="nothing to export"):
        export(out, tmp_path / "none", "hf", strategy="random", keep_fraction=0.0,
               protect="none")


def test_dest_holding_foreign_files_is_never_touched(out, tmp_path, private_datasets_cache):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        export(out, dest, "hf", overwrite=True)
    assert (dest / "notes.txt").read_text() == "keep me"
    export(out, tmp_path / "ok", "hf")
    with pytest.raises(InputError, match="--overwrite"):
        export(out, tmp_path / "ok", "hf")
    (tmp_path / "ok" / "dataset" / "extra.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="did not write"):
        export(out, tmp_path / "ok", "hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "ok"]  # no temporaries


def test_failed_export_leaves_the_earlier_one_whole(out, tmp_path, monkeypatch,
                                                    private_datasets_cache):
    import profit_prep.training.exports.writers as export_writers

    dest = tmp_path / "lf"
    export(out, dest, "llamafactory")
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export_writers.WRITERS, "llamafactory", boom)
    with pytest.raises(OSError):
        export(out, dest, "llamafactory", overwrite=True, tau=0.5)
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lf"]


def test_options_are_loads(out, tmp_path):
    with pytest.raises(InputError, match="no per-token weight input"):
        export(out, tmp_path / "a", "axolotl", weights="prob")
    with pytest.raises(InputError, match="unknown export format"):
        export(out, tmp_path / "a", "megatron")
    with pytest.raises(TypeError, match="unknown options"):
        export(out, tmp_path / "a", "hf", labels=True)
    assert set(FORMATS) == {"llamafactory", "axolotl", "ms-swift", "hf", "trl"}


def test_hf_weights_travel_with_the_response_mask(out, tmp_path, private_datasets_cache):
    dest = tmp_path / "hf"
    export(out, dest, "hf", weights="prob")
    ds = datasets.load_from_disk(str(dest / "dataset"))
    assert ds.column_names == ["input_ids", "attention_mask", "labels", "weights",
                               "response_mask"]
    row = ds[0]
    weights, resp = np.array(row["weights"]), np.array(row["response_mask"], bool)
    assert np.all(weights[~resp] == 0) and np.all((weights[resp] > 0) & (weights[resp] <= 1))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profit_prep.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_cli_export_and_check(out, tmp_path):
    dest = tmp_path / "ax"
    done = run_cli("export", str(out), "--to", "axolotl", "--dest", str(dest),
                   "--strategy", "random", "--keep-fraction", "0.5", "--seed", "3")
    assert done.returncode == 0, done.stderr
    trained = sum(int(k.sum()) for _, k in oracle(out).values())
    assert f"{trained:,} of" in done.stdout
    check = run_cli("export", "--check", str(dest))
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stdout
    again = run_cli("export", str(out), "--to", "axolotl", "--dest", str(dest))
    errors = [x for x in again.stderr.splitlines() if x.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0]
    assert "Traceback" not in again.stderr
