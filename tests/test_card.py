"""The dataset card (profit_prep.card): datasets reads every row through it, its provenance is the
manifest's, and nothing the user or the data chose can break out of YAML or Markdown."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from profit_prep import ScoreConfig, score
from profit_prep.cli import main
from profit_prep.errors import InputError
from profit_prep.store.card import card_text, input_name, md
from profit_prep.store.reader import read_manifest, verify
from tests.conftest import DEMO_GSM8K, score_demo, write_jsonl

MARKER = "ZEBRA-QUOKKA-7"  # text of the rows: must never reach the card


def _front(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    head, sep, body = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head), body


def _table(body: str) -> dict[str, str]:
    """The provenance table: key -> value with the Markdown escapes undone."""
    cells = {}
    for line in body.splitlines():
        m = re.fullmatch(r"\| (.+?) \| (.*) \|", line)
        if m and m.group(1) not in ("---",):
            cells[m.group(1)] = re.sub(r"\\(.)", r"\1", m.group(2))
    return cells


def _rows(table: pa.Table) -> str:
    # json keeps NaN (logprobs at t = 0) comparable, which == on floats does not.
    return json.dumps(table.to_pylist(), allow_nan=True)


@pytest.fixture(scope="module")
def carded(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """Rows 0-2 fine, 3-5 all rejected (a zero-row shard), 6-7 fine, 8 rejected; the rows hold
    MARKER."""
    base = tmp_path_factory.mktemp("card")
    rows = [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()[:9]]
    for n, row in enumerate(rows):
        row["question"] = f"{MARKER} {row['question']}"
        if n in (3, 4, 5, 8):
            row["answer"] = ""
    data = write_jsonl(base / "train.jsonl", rows)
    out = base / "out"
    score(ScoreConfig(data=str(data), out=str(out), model=str(tiny_model_dir),
                      prompt_field="question", response_field="answer", shard_size=3,
                      quiet=True))
    return out


def test_load_dataset_reads_every_row_through_the_card(carded: Path, tmp_path: Path) -> None:
    import datasets

    manifest = read_manifest(carded)
    assert manifest["counts"]["rejected_rows"] == 4
    assert [s["rows"] for s in manifest["shards"]] == [3, 0, 2]
    cache = str(tmp_path / "hf")
    ds = datasets.load_dataset(str(carded), cache_dir=cache)
    assert list(ds) == ["train"]
    expected = pa.concat_tables([pq.read_table(carded / s["file"]) for s in manifest["shards"]])
    got = ds["train"].with_format("arrow")[:]
    assert got.column_names == expected.column_names
    assert got.num_rows == 5
    assert _rows(got) == _rows(expected.replace_schema_metadata(None))
    rejected = datasets.load_dataset(str(carded), "rejected", split="train", cache_dir=cache)
    lines = [json.loads(line) for line in (carded / "rejected.jsonl").read_text().splitlines()]
    assert rejected.to_list() == lines and len(lines) == 4


def test_card_provenance_equals_the_manifest(carded: Path) -> None:
    manifest = read_manifest(carded)
    text = (carded / "README.md").read_text()
    meta, body = _front(text)
    facts = meta["profit_prep"]
    assert facts["model"] == {k: manifest["model"][k] for k in ("name", "content_hash")}
    assert facts["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert facts["chat_template"] == {k: manifest["chat_template"][k] for k in ("source", "sha256")}
    assert facts["mask"] == manifest["mask"]
    assert facts["counts"] == manifest["counts"]
    assert facts["profit_prep_version"] == manifest["profit_prep_version"]
    assert facts["input"]["name"] == "train.jsonl"  # a local file by its name, no folders
    assert facts["input"]["rows"] == manifest["input"]["rows"] == 9
    assert "license" not in meta  # unknown for a user's file: not guessed
    cells = _table(body)
    assert cells["reference model"] == manifest["model"]["name"]
    assert cells["model content hash"] == manifest["model"]["content_hash"]
    assert cells["tokenizer fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert cells["chat template"] == (f"{manifest['chat_template']['source']}, sha256 "
                                      f"{manifest['chat_template']['sha256']}")
    assert cells["protected tokens"] == manifest["mask"]["protect"]
    assert cells["mask rule"] == f"strategy=higher, tau={manifest['mask']['tau']}"
    for key, value in manifest["counts"].items():
        assert cells[key.replace("_", " ")] == str(value)
    assert cells["profit-prep"].startswith(manifest["profit_prep_version"])
    assert MARKER not in text and str(carded.parent) not in text


def test_demo_input_names_its_licence(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = score_demo(tmp_path / "out", tiny_model_dir, limit=2)
    meta, body = _front((out / "README.md").read_text())
    assert meta["license"] == "mit"
    assert meta["profit_prep"]["input"]["license_file"] == "profit_prep/data/GSM8K_LICENSE"
    assert (Path(__file__).parent.parent / meta["profit_prep"]["input"]["license_file"]).exists()
    assert "GSM8K" in _table(body)["input"]
    assert [c["config_name"] for c in meta["configs"]] == ["default"]  # no rejected rows


def test_verify_overwrite_and_resume_own_the_card(carded: Path, tmp_path: Path,
                                                  tiny_model_dir: Path) -> None:
    assert verify(carded) == []
    out = score_demo(tmp_path / "out", tiny_model_dir, limit=2)
    card = (out / "README.md").read_text()
    (out / "README.md").write_text("edited\n")
    score_demo(out, tiny_model_dir, limit=2)  # resume: nothing to score, the card is rewritten
    assert (out / "README.md").read_text() == card_text(read_manifest(out))
    assert verify(out) == []
    score_demo(out, tiny_model_dir, limit=2, overwrite=True)  # README.md is not foreign
    assert (out / "README.md").read_text() == card
    assert not [p for p in out.iterdir() if p.name.startswith(".README")]


def test_a_users_readme_is_foreign(tmp_path: Path, tiny_model_dir: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "README.md").write_text("mine\n")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="holds no profit-prep output"):
            score_demo(fresh, tiny_model_dir, limit=2, overwrite=overwrite)
    assert (fresh / "README.md").read_text() == "mine\n"
    assert sorted(p.name for p in fresh.iterdir()) == ["README.md"]
    # A link at the card's name is never written through, with or without --overwrite.
    out = score_demo(tmp_path / "out", tiny_model_dir, limit=2)
    target = tmp_path / "target.md"
    target.write_text("theirs\n")
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(target)
    with pytest.raises(InputError, match="README.md"):
        score_demo(out, tiny_model_dir, limit=2, overwrite=True)
    assert target.read_text() == "theirs\n"


def test_card_command_rewrites_the_card(carded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (carded / "README.md").read_text()
    (carded / "README.md").unlink()
    assert main(["card", str(carded)]) == 0
    assert (carded / "README.md").read_text() == before
    assert main(["card", str(carded), "--license", "cc-by-sa-4.0"]) == 0
    assert _front((carded / "README.md").read_text())[0]["license"] == "cc-by-sa-4.0"
    capsys.readouterr()
    assert main(["card", str(carded), "--license", "MIT\nx: y"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "licence identifier" in err and "\nx: y" not in err
    assert main(["card", str(carded)]) == 0  # back as the run wrote it
    assert (carded / "README.md").read_text() == before


def test_card_command_refuses_an_unfinished_or_damaged_output(
    carded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["card", str(tmp_path)]) == 2
    assert "not a profit-prep output" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
    # A damaged output gets no card: the card would describe files that are not there.
    (carded / "data" / "part-00002.parquet").rename(tmp_path / "moved.parquet")
    try:
        assert main(["card", str(carded)]) == 2
        assert "damaged output" in capsys.readouterr().err
    finally:
        (tmp_path / "moved.parquet").rename(carded / "data" / "part-00002.parquet")
    assert main(["card", "s3://bucket/run"]) == 2
    assert "on an object store the run writes it" in capsys.readouterr().err


_NASTY = ["evil\n---\nlicense: x", "<script>alert(1)</script>", "[x](http://e.example) | `a`",
          "\x1b[2J\u202e\x85\u2028", "# h\n\n```", "yes", "\ud800", "a: b #c", " lead"]


def _manifest(carded: Path, text: str) -> dict[str, Any]:
    manifest = read_manifest(carded)
    manifest["model"] = {**manifest["model"], "name": text}
    manifest["chat_template"] = {**manifest["chat_template"], "source": text}
    manifest["input"] = {**manifest["input"], "path": text}
    return manifest


def _check_inert(value: str, card: str) -> None:
    meta, body = _front(card)
    assert meta["profit_prep"]["model"]["name"] == value  # YAML keeps it exactly
    assert meta["profit_prep"]["chat_template"]["source"] == value
    assert "license" not in meta
    lines = card.splitlines()
    assert lines.count("---") == 2  # nothing closes the front matter early
    assert all(ch.isprintable() for line in lines for ch in line)
    cells = _table(body)
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)
    assert cells["reference model"] == shown
    row = next(line for line in body.splitlines() if line.startswith("| reference model |"))
    raw = row[len("| reference model | "):-len(" |")]
    # Every ASCII punctuation character of the value is escaped: no tag, link, code span or
    # cell end can start (read the cell as CommonMark does: a backslash escapes the next one).
    pos = 0
    while pos < len(raw):
        if raw[pos] == "\\":
            pos += 2
            continue
        assert not re.match(r"[!-/:-@\[-`{-~]", raw[pos]), (raw, pos)
        pos += 1


@pytest.mark.parametrize("value", _NASTY)
def test_user_strings_are_escaped(carded: Path, value: str) -> None:
    card = card_text(_manifest(carded, value))
    _check_inert(value, card)


@settings(max_examples=60, deadline=None)
@given(value=st.text(min_size=1, max_size=40))
def test_any_user_string_stays_inert(carded: Path, value: str) -> None:
    card = card_text(_manifest(carded, value))
    _check_inert(value, card)
    assert len(card.splitlines()) == len(card_text(_manifest(carded, "m")).splitlines())


def test_url_input_names_carry_no_credentials() -> None:
    name = input_name("s3://AKIAFAKE:S3CRETFAKE@bucket/dir/train.jsonl?X-Amz-Signature=abc")
    assert name == "s3://bucket/dir/train.jsonl"
    assert input_name("/home/alice/private/train.jsonl") == "train.jsonl"
    assert input_name("openai/gsm8k") == "openai/gsm8k"


def test_md_escapes_every_markup_character() -> None:
    assert md("a*b_c") == "a\\*b\\_c"
    assert md("x\ny\x1b") == r"x\\ny\\x1b"  # breaks and controls become visible text


@pytest.mark.slow
def test_real_model_output_loads_through_its_card(scored_output: Path, tmp_path: Path) -> None:
    """End to end with SmolLM2: the card of a real run reads back every row, and names it."""
    import datasets

    manifest = read_manifest(scored_output)
    ds = datasets.load_dataset(str(scored_output), split="train", cache_dir=str(tmp_path))
    expected = pa.concat_tables([pq.read_table(scored_output / s["file"])
                                 for s in manifest["shards"]])
    assert ds.num_rows == manifest["counts"]["scored_rows"] == 24
    assert _rows(ds.with_format("arrow")[:]) == _rows(expected.replace_schema_metadata(None))
    meta, body = _front((scored_output / "README.md").read_text())
    assert meta["profit_prep"]["model"]["content_hash"] == manifest["model"]["content_hash"]
    assert _table(body)["reference model"] == manifest["model"]["name"]
