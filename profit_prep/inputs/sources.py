"""Input sources: hand out an SFT dataset's raw rows by index range.

A source maps shards of the output to input ranges, so a crashed run resumes, and each range
has a digest, so an input edited between runs is never mixed in. Sources: JSONL, JSON (an array
of objects, or an object holding one), Parquet, a ``datasets`` dataset saved with
``save_to_disk``, and ``datasets.load_dataset`` names when the hub is reachable. Indexes are
compact (8-16 bytes a row) so that a 10M-row input is not held in memory
(docs/benchmarks.md, "What holds memory"). Turning a row into chat messages is
:mod:`profit_prep.inputs.formats`'s job.

Example:
    >>> source = open_source("data.jsonl")  # doctest: +SKIP
    >>> rows = source.read(0, 10)  # doctest: +SKIP
    >>> source.digest(0, 10)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.inputs.checks import (
    BOM,
    SURROGATE_ESCAPE,
    check_encoding,
    check_kind,
    check_parquet,
    check_path,
    escape_text,
    invalid_text,
    looks_local,
)
from profit_prep.inputs.json_array import json_array_spans


@dataclass
class RawRow:
    """One input row: its position in the source, its id, and its data or why it is unreadable."""

    index: int
    example_id: str
    data: dict[str, Any] | None
    error: str | None = None
    fmt: str | None = None  # the format the row was read as (set when it is rendered)


class Source:
    """Random access to a dataset's rows by index range."""

    path: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> list[RawRow]:
        raise NotImplementedError

    def digest(self, start: int, stop: int) -> str:
        """A hash of rows ``[start, stop)`` as stored: a resumed run compares it with the one
        kept beside each finished shard, so an input edited between runs is never mixed in."""
        raise NotImplementedError

    def id_hashes(self, n_rows: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """A 64-bit hash of the example id of each row in ``[0, n_rows)``, and which rows have
        one (an unreadable row, or one without its id, has none).

        Equal ids hash equal within this process (Python's string hash); different ids may
        collide, so a caller compares candidates' ids exactly. 9 bytes a row, where a dict of
        id strings costs ~130 (:func:`profit_prep.inputs.duplicate_ids.find_duplicates`).
        """
        hashes = np.zeros(n_rows, np.int64)
        valid = np.zeros(n_rows, bool)
        for start in range(0, n_rows, chunk):
            ids = [None if row.error else row.example_id
                   for row in self.read(start, min(start + chunk, n_rows))]
            _hash_ids(ids, start, hashes, valid)
        return hashes, valid

    def _parse(self, index: int, raw: bytes) -> RawRow:
        """One JSON row's bytes (JSONL line, JSON-array element): a row, or why it is unreadable."""
        try:
            data = json.loads(raw.decode("utf-8").removeprefix(BOM))
        except UnicodeDecodeError as exc:
            return RawRow(index, str(index), None, f"invalid UTF-8: {exc.reason}")
        except json.JSONDecodeError as exc:
            return RawRow(index, str(index), None, f"malformed JSON: {exc.msg}")
        except RecursionError:
            return RawRow(index, str(index), None, TOO_DEEP)
        # Decoded UTF-8 never holds a surrogate: only a JSON escape can make one.
        return self._wrap(index, data, self.id_field, SURROGATE_ESCAPE.search(raw) is not None)

    def _wrap(self, index: int, data: Any, id_field: str | None, check: bool = True) -> RawRow:
        """Every reader's rows pass here: the one place a row's text is checked to be valid
        Unicode before any tokenizer or writer sees it."""
        if not isinstance(data, Mapping):
            kind = type(data).__name__
            return RawRow(index, str(index), None, f"row is a JSON {kind}, not an object")
        data = dict(data)
        example_id = str(index)
        if id_field is not None and data.get(id_field) is not None:
            example_id = str(data[id_field])
        bad = invalid_text(data) if check else None
        if bad is not None:
            # The id is written escaped: a lone surrogate cannot be encoded in the side file.
            return RawRow(index, escape_text(example_id), None,
                          f"{bad} is not valid Unicode (a lone surrogate such as \\ud800)")
        if id_field is not None and data.get(id_field) is None:
            return RawRow(index, str(index), data, f"id field {id_field!r} is missing or null")
        return RawRow(index, example_id, data)


class JsonlSource(Source):
    """JSON Lines. Byte offsets of every line are indexed once, so ranges read without a scan:
    8 bytes a row (a numpy array; a list of ints would take ~36)."""

    def __init__(self, path: Path, id_field: str | None = None) -> None:
        self.path = str(path)
        self.id_field = id_field
        offsets = array("q")  # grows in place (realloc), never two copies at once
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if not line.isspace():  # blank lines are layout, not rows
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.frombuffer(offsets, np.int64) if offsets else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, start: int, stop: int) -> list[RawRow]:
        rows = []
        with open(self.path, "rb") as f:
            for index in range(start, min(stop, len(self))):
                f.seek(int(self.offsets[index]))
                rows.append(self._parse(index, f.readline()))
        return rows

    def digest(self, start: int, stop: int) -> str:
        stop = min(stop, len(self))
        if start >= stop:
            return _sha256(b"")
        begin = int(self.offsets[start])
        with open(self.path, "rb") as f:
            end = int(self.offsets[stop]) if stop < len(self) else f.seek(0, os.SEEK_END)
            f.seek(begin)
            return _hash_stream(f, end - begin)

    def id_hashes(self, n_rows: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """Fast path: pyarrow's JSON reader takes the id column alone, ``chunk`` rows at a time
        (~5x faster than parsing every row in Python: 1M rows in ~2 s on 2 cores). A chunk
        with a row it cannot read exactly as :meth:`read` does (malformed, not an object, an id
        that is not a string) makes it give up, and the rows are parsed one by one instead."""
        if self.id_field is not None:
            fast = self._arrow_id_hashes(n_rows, chunk)
            if fast is not None:
                return fast
        return super().id_hashes(n_rows, chunk)

    def _arrow_id_hashes(self, n_rows: int, chunk: int) -> tuple[np.ndarray, np.ndarray] | None:
        import pyarrow as pa
        import pyarrow.json as pj

        hashes = np.zeros(n_rows, np.int64)
        valid = np.zeros(n_rows, bool)
        parse = pj.ParseOptions(explicit_schema=pa.schema([(self.id_field, pa.string())]),
                                unexpected_field_behavior="ignore")
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            for start in range(0, min(n_rows, len(self)), chunk):
                stop = min(start + chunk, n_rows, len(self))
                begin = int(self.offsets[start])
                end = int(self.offsets[stop]) if stop < len(self) else size
                f.seek(begin)
                raw = f.read(end - begin)
                try:  # the chunk as one block: rows of any length, memory bounded by the chunk
                    table = pj.read_json(pa.BufferReader(raw), parse_options=parse,
                                         read_options=pj.ReadOptions(block_size=len(raw) + 1,
                                                                     use_threads=False))
                except pa.ArrowException:
                    return None
                if table.num_rows != stop - start:  # one object per line, or ids misalign
                    return None
                _hash_ids(table.column(0).to_pylist(), start, hashes, valid)
        return hashes, valid


class JsonArraySource(Source):
    """A JSON file holding one array of rows. The array is indexed once (byte span of every
    element, found without parsing), so memory does not grow with the file and a row that cannot
    be parsed (malformed, nested too deeply) is rejected alone."""

    def __init__(self, path: Path, id_field: str | None = None) -> None:
        self.path = str(path)
        self.id_field = id_field
        self.spans = json_array_spans(path)  # (rows, 2) int64: 16 bytes a row

    def __len__(self) -> int:
        return len(self.spans)

    def read(self, start: int, stop: int) -> list[RawRow]:
        rows = []
        with open(self.path, "rb") as f:
            for index in range(start, min(stop, len(self))):
                begin, end = (int(x) for x in self.spans[index])
                f.seek(begin)
                rows.append(self._parse(index, f.read(end - begin)))
        return rows

    def digest(self, start: int, stop: int) -> str:
        stop = min(stop, len(self))
        if start >= stop:
            return _sha256(b"")
        begin, end = int(self.spans[start][0]), int(self.spans[stop - 1][1])
        with open(self.path, "rb") as f:
            f.seek(begin)
            return _hash_stream(f, end - begin)


TOO_DEEP = "JSON nested too deeply to parse"


def _hash_ids(ids: list[str | None], start: int, hashes: np.ndarray, valid: np.ndarray) -> None:
    """Hash the ids of rows ``start, start + 1, ...`` into ``hashes``; None (no id) is not valid."""
    for i, value in enumerate(ids, start):
        if value is not None:
            hashes[i] = hash(value)
            valid[i] = True


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hash_stream(f: Any, length: int) -> str:
    digest = hashlib.sha256()
    while length > 0:
        block = f.read(min(length, 1 << 20))
        if not block:
            break
        digest.update(block)
        length -= len(block)
    return "sha256:" + digest.hexdigest()


class ListSource(Source):
    """Rows already in memory (a JSON list, or rows built in Python)."""

    def __init__(self, rows: list[Any], path: str = "<memory>", id_field: str | None = None):
        self.rows = rows
        self.path = path
        self.id_field = id_field

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, start: int, stop: int) -> list[RawRow]:
        stop = min(stop, len(self.rows))
        return [self._wrap(i, self.rows[i], self.id_field) for i in range(start, stop)]

    def digest(self, start: int, stop: int) -> str:
        rows = self.rows[start:stop]
        return _sha256(json.dumps(rows, sort_keys=True, default=str).encode())


class ArrowSource(Source):
    """Parquet files and ``datasets`` datasets: both are Arrow tables with cheap slicing."""

    def __init__(self, dataset: Any, path: str, id_field: str | None = None) -> None:
        self.dataset = dataset  # a datasets.Dataset (memory-mapped, pickles by file reference)
        self.path = path
        self.id_field = id_field

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, start: int, stop: int) -> list[RawRow]:
        stop = min(stop, len(self))
        try:
            table = self.dataset.data.slice(start, stop - start).to_pylist()
        except UnicodeDecodeError:  # Parquet does not check that strings are UTF-8: row by row
            return [self._read_one(i) for i in range(start, stop)]
        return [self._wrap(start + i, row, self.id_field) for i, row in enumerate(table)]

    def _read_one(self, index: int) -> RawRow:
        table = self.dataset.data.slice(index, 1).table
        try:
            return self._wrap(index, table.to_pylist()[0], self.id_field)
        except UnicodeDecodeError:
            bad = []
            for name in table.column_names:
                try:
                    table.column(name).to_pylist()
                except UnicodeDecodeError:
                    bad.append(name)
            return RawRow(index, str(index), None,
                          f"{', '.join(bad) or 'a column'} is not valid UTF-8")

    def id_hashes(self, n_rows: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """A string id column is read alone (the other columns are never decoded)."""
        import pyarrow as pa

        table = self.dataset.data
        if self.id_field not in table.column_names or not (
            pa.types.is_string(kind := table.schema.field(self.id_field).type)
            or pa.types.is_large_string(kind)
        ):
            return super().id_hashes(n_rows, chunk)
        column = table.column(self.id_field)
        hashes = np.zeros(n_rows, np.int64)
        valid = np.zeros(n_rows, bool)
        for start in range(0, n_rows, chunk):
            try:
                ids = column.slice(start, min(chunk, n_rows - start)).to_pylist()
            except UnicodeDecodeError:  # an id that is not UTF-8: rows one by one, as read does
                return super().id_hashes(n_rows, chunk)
            _hash_ids(ids, start, hashes, valid)
        return hashes, valid

    def digest(self, start: int, stop: int) -> str:
        import pyarrow as pa

        stop = min(stop, len(self))
        table = self.dataset.data.slice(start, max(stop - start, 0)).table
        # A slice shares its parent's buffers (IPC would write other rows' bytes too): take()
        # copies just these rows; the schema metadata holds datasets' whole-file facts.
        table = table.take(pa.array(range(table.num_rows))).replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return _sha256(sink.getvalue().to_pybytes())


def open_source(
    path: str | Path, *, id_field: str | None = None, split: str = "train"
) -> Source:
    """Open a dataset by path or ``datasets`` name; raise :class:`InputError` if impossible."""
    import datasets

    p = Path(path)
    name = str(path)
    check_path(name, "--data")
    check_kind(p)
    if p.is_file():
        suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
        if suffix in (".jsonl", ".ndjson", ".json"):
            check_encoding(p)
        if suffix in (".jsonl", ".ndjson"):
            return JsonlSource(p, id_field)
        if suffix == ".json":
            first = _first_byte(p)
            if not first:
                raise InputError(f"{p}: empty file")
            if first == b"[":
                return JsonArraySource(p, id_field)
            return _json_object_source(p, id_field)
        if suffix == ".parquet":
            check_parquet([p])
            ds = datasets.Dataset.from_parquet(name, keep_in_memory=False)
            return ArrowSource(ds, name, id_field)
        raise InputError(f"{p}: unknown file type {suffix!r} (use .jsonl, .json or .parquet)")
    if p.is_dir():
        if not any(p.iterdir()):
            raise InputError(f"{p}: an empty folder, not a dataset")
        if any(p.glob("*.parquet")):
            files = sorted(str(f) for f in p.glob("*.parquet"))
            for file in files:
                check_path(file, "--data file")
            check_parquet([Path(f) for f in files])
            return ArrowSource(datasets.Dataset.from_parquet(files), name, id_field)
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any((p / f).is_file() for f in saved):
            raise InputError(f"{p}: a folder with no .parquet files and no dataset saved with "
                             "save_to_disk; pass a .jsonl, .json or .parquet file")
        try:
            ds = datasets.load_from_disk(name)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(f"{p}: not a dataset saved with save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{p}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        return ArrowSource(ds, name, id_field)
    if looks_local(name):  # a missing file, not a hub name: no 30 s wait for the hub
        raise InputError(f"{name}: no such file")
    # Not a local path: try the hub (works only where it is reachable).
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot open"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{name}: no such file, and load_dataset failed: {first}") from None
    return ArrowSource(ds, name, id_field)


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace (or a byte-order mark)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def _json_object_source(p: Path, id_field: str | None) -> Source:
    """A JSON object with one list of rows (``{"data": [...]}``): parsed whole, as it must be."""
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))  # a BOM, as every reader
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not valid JSON ({exc}); use .jsonl for one row per line") from None
    except RecursionError:
        raise InputError(f"{p}: {TOO_DEEP}; use .jsonl for one row per line") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{p}: expected a JSON list of rows")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise InputError(f"{p}: expected a JSON list of rows, got {type(data).__name__}")
    return ListSource(data, str(p), id_field)
