"""Sources: every input kind reads the same rows by range, bad rows are rejected alone, damaged
files are one clear error, and digests follow the content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profit_prep.errors import InputError
from profit_prep.inputs.sources import open_source
from tests.conftest import DEMO_GSM8K, write_jsonl


def test_jsonl_ranges_equal_whole_read(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(23)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    source = open_source(path)
    assert len(source) == 23
    pieces = [r for start in range(0, 23, 5) for r in source.read(start, start + 5)]
    assert [r.data for r in pieces] == rows
    assert [r.example_id for r in pieces] == [str(i) for i in range(23)]


def test_jsonl_bad_lines_become_row_errors_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n\n[1, 2]\n{"a": "\xff\xfe"}\n{"a": 2}\n')
    rows = open_source(path).read(0, 100)
    assert len(rows) == 5  # the blank line is layout, not a row
    assert [r.error is None for r in rows] == [True, False, False, False, True]
    assert rows[1].error.startswith("malformed JSON")
    assert "not an object" in rows[2].error
    assert "UTF-8" in rows[3].error


def test_id_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x7", "v": 1}, {"v": 2}])
    rows = open_source(path, id_field="id").read(0, 2)
    assert rows[0].example_id == "x7" and rows[0].error is None
    assert "id field 'id'" in rows[1].error


def test_json_parquet_and_saved_dataset_read_the_same_rows(tmp_path: Path) -> None:
    import datasets

    rows = [json.loads(line) for line in DEMO_GSM8K.read_text().splitlines()[:12]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("d.json", "d.parquet", "saved", "saved_dict"):
        source = open_source(tmp_path / name)
        assert [r.data for r in source.read(3, 9)] == rows[3:9], name


def test_missing_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file type"):
        open_source(tmp_path / "x.csv")


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_deeply_nested_row_is_rejected_alone(tmp_path: Path, kind: str) -> None:
    good = {"instruction": "hi", "output": "there"}
    rows = [json.dumps(good), '{"instruction": "x", "output": ' + _deep(100_000) + "}",
            json.dumps({**good, "extra": json.loads(_deep(500))}), json.dumps(good)]
    path = tmp_path / f"rows.{kind}"
    path.write_text("\n".join(rows) if kind == "jsonl" else "[" + ",\n".join(rows) + "]")
    read = open_source(path).read(0, 10)
    assert [r.error for r in read] == [None, "JSON nested too deeply to parse", None, None]
    assert read[0].data == read[3].data == good


@pytest.mark.parametrize(
    ("text", "rows"),
    [("[]", []), (" \n[ ]\n", []), ("\ufeff[{\"a\": 1}]", [{"a": 1}]),
     ('[{"a": "x,]}\\"[{"}, {"b": [1, {"c": []}]}]', [{"a": 'x,]}"[{'}, {"b": [1, {"c": []}]}]),
     ('[\n  {"s": "\\\\"},\n  {"t": "\\u00e9\u00e9"}\n]', [{"s": "\\"}, {"t": "\u00e9\u00e9"}])],
)
def test_json_array_rows_are_found_without_parsing_the_whole_file(tmp_path: Path, text: str,
                                                                  rows: list) -> None:
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    source = open_source(tmp_path / "a.json")
    assert [r.data for r in source.read(0, 10)] == rows


@pytest.mark.parametrize(
    ("text", "message"),
    [("[{\"a\": 1}, {\"b\"", "not closed"), ('[{"a": "b', "unterminated string"),
     ("[1}]", "unbalanced"), ("[1] [2]", "text after the JSON array"), ("", "empty file"),
     ('{"rows": [1], "more": [2]}', "expected a JSON list"), ("{", "not valid JSON")],
)
def test_broken_json_array_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a.json").write_text(text)
    with pytest.raises(InputError, match=message):
        open_source(tmp_path / "a.json")


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_damaged_parquet_input_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 100, "completion": ["b"] * 100}), path)
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[: len(blob) // 2], "text": b"id,text\n1,hello\n",
                      "empty": b""}[damage])
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_source(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    path.rename(folder / "part-0.parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_source(folder)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_digest_changes_with_content_not_with_other_rows(tmp_path: Path, kind: str) -> None:
    from tests.conftest import write_rows

    def digests(rows: list[dict]) -> list[str]:
        source = open_source(write_rows(tmp_path / f"d.{kind}", rows))
        return [source.digest(0, 2), source.digest(2, 4)]

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    edited = [dict(r) for r in rows]
    edited[3]["completion"] = "c9"
    first, second = digests(rows), digests(edited)
    assert first[0] == second[0] and first[1] != second[1]
