"""Check an export against its source: re-read the written container and compare every row's
labels with the source output's ids, response tokens and the recorded rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.rules.profit import end_of_turn_ids_of, resolve_rule
from profit_prep.store.reader import check_shards, read_manifest
from profit_prep.store.safe_files import sha256_file
from profit_prep.store.schema import flat_list
from profit_prep.training.exports.writers import EXPORT_MANIFEST
from profit_prep.training.loader import load


def check_export(dest: str | Path) -> list[str]:
    """Every way an export differs from what its trainer should train on (empty: none).

    Re-reads the written container (not the writer's memory) and compares it with the source
    output under the recorded rule: files unchanged since the export; per row, labels are the
    ids where trained and -100 elsewhere (Hugging Face alignment: labels[t] is token t, the
    trainers shift), every trained token is a response token and exactly the rule's, end-of-turn
    tokens are trained when the rule protects them; rows left with no trained token are
    reported (also those the export itself left out).
    """
    target = Path(dest)
    try:
        record = json.loads((target / EXPORT_MANIFEST).read_text())
        to, files = record["format"], record["files"]
        source = record["source"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{target}: not a profit-prep export (no readable {EXPORT_MANIFEST})")\
            from None
    problems = [f"{f}: missing" for f in files if not (target / f).is_file()]
    problems += [f"{f}: changed since the export" for f in files
                 if (target / f).is_file() and sha256_file(target / f) != files[f]]
    if problems:
        return problems
    out = Path(source["path"])
    manifest = read_manifest(out)
    if [s["sha256"] for s in manifest["shards"]] != source["shards"]:
        return [f"the source output {out} changed since the export (shard checksums differ)"]
    check_shards(out, manifest)
    expected = _expected(out, manifest, source)
    eot = _protected_ids(manifest, source)
    rows = _read_container(target, to, files, out, manifest)
    problems += [f"row {e}: has no trained token" for e in record.get("empty_rows", [])]
    for example_id, (ids, labels) in rows.items():
        problems += _check_row(example_id, ids, labels, expected, eot)
    missing = set(expected) - set(rows) - set(record.get("empty_rows", [])) - {
        r["example_id"] for r in record.get("refused", [])}
    problems += [f"row {e}: in the source but not in the export" for e in sorted(missing)]
    return problems


def _protected_ids(manifest: dict[str, Any], source: dict[str, Any]) -> list[int] | None:
    rule = source["rule"]
    if "select" in rule:
        protect = rule.get("protect")
        return end_of_turn_ids_of(manifest, resolve_rule(None, protect=protect)) \
            if protect else None
    return end_of_turn_ids_of(manifest, resolve_rule(rule))


def _expected(out: Path, manifest: dict[str, Any], source: dict[str, Any]
              ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, response, kept) per row, from the shards themselves and the recorded options."""
    from profit_prep.rules.selection import Select

    options = dict(source["options"])
    options.pop("tokenizer", None)
    options.pop("allow_tokenizer_mismatch", None)
    if "select" in options:
        options["select"] = Select(**options["select"])
    ds = load(out, response_mask=True, **options)
    rows = _rows_all(ds)
    return rows


def _rows_all(ds: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    ids, offsets = flat_list(table["input_ids"])
    keep, _ = flat_list(table["completion_mask"])
    resp, _ = flat_list(table["response_mask"])
    result = {}
    for i, name in enumerate(table["example_id"].to_pylist()):
        s, e = offsets[i], offsets[i + 1]
        result[name] = (ids[s:e].astype(np.int64), resp[s:e].astype(bool),
                        keep[s:e].astype(bool))
    return result


def _read_container(target: Path, to: str, files: dict[str, str], out: Path,
                    manifest: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) per exported row, labels -100 where not trained, read from the files."""
    record = json.loads((target / EXPORT_MANIFEST).read_text())
    names = _exported_ids(record, out, manifest)
    if to in ("llamafactory", "hf", "trl"):
        import datasets

        folder = "tokenized" if to == "llamafactory" else "dataset"
        ds = datasets.load_from_disk(str(target / folder))
        if to == "llamafactory":
            ds = ds["train"]
        table = ds.data.table
    elif to == "axolotl":
        table = pq.read_table(target / next(f for f in files if f.endswith(".parquet")))
    else:
        from profit_prep.training.exports import swift as export_swift

        jsonl = target / next(f for f in files if f.endswith(".jsonl"))
        return export_swift.read_back(jsonl, out, manifest, names)
    ids = [np.asarray(r, dtype=np.int64) for r in table["input_ids"].to_pylist()]
    if "labels" in table.column_names:
        labels = [np.asarray(r, dtype=np.int64) for r in table["labels"].to_pylist()]
    else:
        masks = table["completion_mask"].to_pylist()
        labels = [np.where(np.asarray(m, bool), i, -100) for i, m in zip(ids, masks)]
    if len(names) != len(ids):
        raise InputError(f"{target}: {len(ids)} rows, the export record names {len(names)}")
    return {n: (i, lab) for n, i, lab in zip(names, ids, labels)}


def _exported_ids(record: dict[str, Any], out: Path, manifest: dict[str, Any]) -> list[str]:
    """Exported rows in order: the source's order less the left-out and refused ones."""
    skip = set(record.get("empty_rows", [])) | {r["example_id"] for r in record.get("refused", [])}
    names = []
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"], columns=["example_id"])
        names += [n for n in table["example_id"].to_pylist() if n not in skip]
    return names


def _check_row(example_id: str, ids: np.ndarray, labels: np.ndarray,
               expected: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
               eot: list[int] | None) -> list[str]:
    where = f"row {example_id}"
    if example_id not in expected:
        return [f"{where}: not in the source output"]
    src_ids, response, keep = expected[example_id]
    if len(ids) != len(labels):
        return [f"{where}: {len(ids)} input_ids but {len(labels)} labels"]
    if len(ids) > len(src_ids) or not np.array_equal(ids, src_ids[:len(ids)]):
        return [f"{where}: input_ids differ from the scored ones"]
    trained = labels != -100
    problems = []
    if np.any(labels[trained] != ids[trained]):
        return [f"{where}: labels are not the ids where trained (shifted or wrong)"]
    n = len(ids)
    if np.any(trained & ~response[:n]):
        problems.append(f"{where}: trains {int((trained & ~response[:n]).sum())} non-response "
                        "tokens")
    if not np.array_equal(trained, keep[:n]):
        problems.append(f"{where}: trained tokens differ from the rule's mask at "
                        f"{int((trained != keep[:n]).sum())} positions")
    if eot is not None:
        lost = response[:n] & np.isin(ids, eot) & ~trained
        if lost.any():
            problems.append(f"{where}: {int(lost.sum())} end-of-turn tokens not trained though "
                            "protected")
    if not trained.any():
        problems.append(f"{where}: has no trained token")
    return problems
