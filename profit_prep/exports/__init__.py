"""Exports of a scored output in the container and columns a given trainer reads.

``export(OUT, DEST, to=FORMAT, **rule)`` writes, into ``DEST``:

=================  ==========================================================================
``llamafactory``   ``tokenized/``: a ``datasets`` ``DatasetDict({"train": ...})`` saved to disk
                   (``input_ids``, ``attention_mask``, ``labels``), and ``llamafactory.yaml``
``axolotl``        ``data-<hash>.parquet`` (exactly ``input_ids``, ``attention_mask``,
                   ``labels``) and ``axolotl.yaml``
``ms-swift``       ``data-<hash>.jsonl``: ``messages`` whose assistant turns are split at the
                   mask's boundaries, each piece with ``"loss": true/false``; ``ms-swift.sh``
``hf``             ``dataset/`` (``input_ids``, ``attention_mask``, ``labels``) for any
                   -100-label trainer, and ``train_hf.py``
``trl``            ``dataset/`` (``input_ids``, ``completion_mask``) for ``SFTTrainer``, and
                   ``train_trl.py``
=================  ==========================================================================

plus ``profit_prep_export.json``: the source output, its shard checksums, tokenizer fingerprint
and rule, the counts, and the sha256 of every file written. Labels follow the Hugging Face
convention (``labels[t]`` belongs to token t; the model shifts), which is what all of these
trainers expect. :func:`check_export` re-reads an export and checks it against its source.

Rows with no trained token are left out and reported (TRL and others would drop them silently or
divide by zero); ms-swift rows whose mask cannot be written as whole messages are refused with
the reason. Nothing is written over a ``DEST`` holding files profit-prep did not write, and an
export appears all at once (built beside ``DEST``, then renamed into place).

Example:
    >>> summary = export("out", "lf", to="llamafactory", tau=0.3)  # doctest: +SKIP
    >>> print(summary.line())  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.errors import InputError
from profit_prep.format import flat_list
from profit_prep.loading import load
from profit_prep.masks import end_of_turn_ids_of, resolve_rule
from profit_prep.output import check_shards, read_manifest, sha256_file

FORMATS = ("llamafactory", "axolotl", "ms-swift", "hf", "trl")
EXPORT_MANIFEST = "profit_prep_export.json"
EXPORT_VERSION = 1
# load()'s parameters that export passes through (the rule, tokenizer check, truncation); the
# columns are the format's business.
LOAD_OPTIONS = tuple(
    name for name in inspect.signature(load).parameters
    if name not in ("path", "labels", "response_mask")
)
_RULE_KEYS = ("strategy", "tau", "tau_low", "tau_high", "keep_fraction", "seed", "protect")
# Only these formats have a column a trainer reads per-token weights from.
_WEIGHTS_FORMATS = ("hf",)


@dataclass
class ExportSummary:
    """What an export wrote: counts, left-out rows, files."""

    format: str
    dest: Path
    rows: int
    tokens: int
    response_tokens: int
    trained_tokens: int
    empty_rows: list[str] = field(default_factory=list)  # no trained token: left out
    refused: list[dict[str, str]] = field(default_factory=list)  # mask not representable
    files: list[str] = field(default_factory=list)
    note: str = ""  # what the trainer does beyond the masks (ms-swift's trained suffix)

    def line(self) -> str:
        share = self.trained_tokens / self.response_tokens if self.response_tokens else 0.0
        text = (f"{self.dest}: {self.rows} rows for {self.format}, {self.trained_tokens:,} of "
                f"{self.response_tokens:,} response tokens trained ({share:.1%}; "
                f"{self.tokens:,} tokens in all)")
        if self.empty_rows:
            text += f"; {len(self.empty_rows)} rows with no trained token left out"
        if self.refused:
            text += (f"; {len(self.refused)} rows refused (mask not representable; reasons in "
                     f"{EXPORT_MANIFEST})")
        return text + (f"; {self.note}" if self.note else "")


def export(
    path: str | Path,
    dest: str | Path,
    to: str,
    *,
    overwrite: bool = False,
    model: str | None = None,
    **options: Any,
) -> ExportSummary:
    """Write ``path``'s masks into ``dest`` in the container ``to`` reads (module docstring).

    ``options`` are :func:`profit_prep.load`'s (``strategy``, ``tau``, ``tau_low``,
    ``tau_high``, ``keep_fraction``, ``seed``, ``protect``, ``select``, ``tokenizer``,
    ``allow_tokenizer_mismatch``, ``max_length``, ``weights`` for ``hf``). ``model`` goes into the
    config snippet (default: the scoring tokenizer's folder; a trainer's model must share it).
    ``overwrite`` replaces an earlier export in ``dest``; files profit-prep did not write are never
    replaced.
    """
    if to not in FORMATS:
        raise InputError(f"unknown export format {to!r} (choose from {', '.join(FORMATS)})")
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise TypeError(f"export() got unknown options {unknown} (load's are {LOAD_OPTIONS})")
    if options.get("weights") is not None and to not in _WEIGHTS_FORMATS:
        raise InputError(f"{to} has no per-token weight input; weights= works with "
                         f"{', '.join(_WEIGHTS_FORMATS)} (docs/trainers.md)")
    if to == "ms-swift" and options.get("max_length") is not None:
        raise InputError("ms-swift renders whole conversations: truncate with its --max_length, "
                         "not max_length=")
    out, target = Path(path), Path(dest)
    _check_dest(target, overwrite)
    manifest = read_manifest(out)
    ds = load(out, labels=True, response_mask=True, **options)
    if len(ds) and not any(sum(k) for k in ds["completion_mask"]):
        raise InputError(f"nothing to export: none of the {len(ds)} rows has a trained token "
                         "under this rule")
    rule = _rule_of(manifest, options)
    source = {
        "path": str(out.resolve()),
        "shards": [s["sha256"] for s in manifest["shards"]],
        "tokenizer": {k: manifest["tokenizer"].get(k) for k in ("path", "fingerprint")},
        "rule": rule,
        "options": {k: _jsonable(v) for k, v in options.items() if v is not None},
    }
    model = model or manifest["tokenizer"].get("path") or "YOUR_MODEL"
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        summary = _WRITERS[to](ds, out, manifest, work, target, model)
        files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        summary.files = files
        record = {
            "profit_prep_export": EXPORT_VERSION, "format": to, "source": source,
            "counts": {"rows": summary.rows, "tokens": summary.tokens,
                       "response_tokens": summary.response_tokens,
                       "trained_tokens": summary.trained_tokens},
            "empty_rows": summary.empty_rows, "refused": summary.refused,
            "files": {f: sha256_file(work / f) for f in files},
        }
        (work / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        _swap_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    summary.dest = target
    return summary


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _rule_of(manifest: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The rule the export's masks follow (what check_export re-applies)."""
    if options.get("select") is not None:
        return {"select": options["select"].to_dict(), "protect": options.get("protect")}
    overrides = {k: options.get(k) for k in _RULE_KEYS}
    return resolve_rule(manifest.get("mask"), **overrides).to_dict()


# -- DEST: only ever replace our own export --------------------------------------------------

def _check_dest(target: Path, overwrite: bool) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise InputError(f"{target} exists and is not a folder; choose another --dest")
    if not target.exists() or not any(target.iterdir()):
        return
    own = _own_files(target)
    if own is None:
        raise InputError(f"{target} holds files profit-prep did not write; choose an empty or "
                         "new --dest")
    if not overwrite:
        raise InputError(f"{target} holds an earlier export; pass --overwrite (overwrite=True) "
                         "to replace it")


def _own_files(target: Path) -> set[Path] | None:
    """The files of an earlier export in ``target``, or None when anything else is there."""
    record = target / EXPORT_MANIFEST
    try:
        listed = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    own = {target / EXPORT_MANIFEST} | {target / f for f in listed}
    for p in target.rglob("*"):
        if p.is_symlink() or (p.is_file() and p not in own):
            return None
        if p.is_dir() and not any(q.is_relative_to(p) for q in own):
            return None
    return own


def _swap_into_place(work: Path, target: Path) -> None:
    """Replace ``target`` (absent, empty, or our own earlier export) by ``work`` at once."""
    old = None
    if target.exists():
        if any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "export")
        else:
            target.rmdir()
    os.rename(work, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- rows ------------------------------------------------------------------------------------

@dataclass
class _Rows:
    """The loaded rows as flat numpy arrays, rows with no trained token split off."""

    ids: list[np.ndarray]
    keep: list[np.ndarray]
    response: list[np.ndarray]
    example_ids: list[str]
    weights: list[np.ndarray] | None
    empty: list[str]


def _rows(ds: Any) -> _Rows:
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    ids, offsets = flat_list(table["input_ids"])
    keep, _ = flat_list(table["completion_mask"])
    resp, _ = flat_list(table["response_mask"])
    weights = flat_list(table["weights"])[0] if "weights" in table.column_names else None
    names = table["example_id"].to_pylist()
    rows = _Rows([], [], [], [], [] if weights is not None else None, [])
    for i, name in enumerate(names):
        s, e = offsets[i], offsets[i + 1]
        k = keep[s:e].astype(bool)
        if not k.any():
            rows.empty.append(name)
            continue
        rows.ids.append(ids[s:e].astype(np.int64))
        rows.keep.append(k)
        rows.response.append(resp[s:e].astype(bool))
        rows.example_ids.append(name)
        if weights is not None and rows.weights is not None:
            rows.weights.append(weights[s:e])
    return rows


def _summary(to: str, rows: _Rows, only: list[int] | None = None,
             refused: list[dict[str, str]] | None = None) -> ExportSummary:
    """Counts over the exported rows (``only``: their indexes, default all)."""
    index = range(len(rows.ids)) if only is None else only
    return ExportSummary(
        format=to, dest=Path(), rows=len(index),
        tokens=sum(len(rows.ids[i]) for i in index),
        response_tokens=sum(int(rows.response[i].sum()) for i in index),
        trained_tokens=sum(int(rows.keep[i].sum()) for i in index),
        empty_rows=rows.empty, refused=refused or [],
    )


def _label_table(rows: _Rows, columns: tuple[str, ...]) -> pa.Table:
    data: dict[str, list[list[int]]] = {}
    if "input_ids" in columns:
        data["input_ids"] = [i.tolist() for i in rows.ids]
    if "attention_mask" in columns:
        data["attention_mask"] = [[1] * len(i) for i in rows.ids]
    if "labels" in columns:
        data["labels"] = [np.where(k, i, -100).tolist() for i, k in zip(rows.ids, rows.keep)]
    if "completion_mask" in columns:
        data["completion_mask"] = [k.astype(int).tolist() for k in rows.keep]
    table = pa.table({k: pa.array(v, pa.list_(pa.int64())) for k, v in data.items()})
    if "weights" in columns and rows.weights is not None:
        table = table.append_column("weights", pa.array([w.tolist() for w in rows.weights],
                                                        pa.list_(pa.float32())))
    if "response_mask" in columns:
        table = table.append_column("response_mask", pa.array(
            [r.astype(int).tolist() for r in rows.response], pa.list_(pa.int64())))
    return table


def _save_to_disk(ds: Any, folder: Path) -> None:
    """``save_to_disk`` without its progress bar (the export prints one summary line)."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(folder))
    finally:
        if shown:
            datasets.enable_progress_bars()


def _content_hash(path: Path) -> str:
    return sha256_file(path).split(":")[1][:12]


def _max_len(rows: _Rows) -> int:
    return max((len(i) for i in rows.ids), default=1)


def _yaml(lines: list[tuple[str, Any, str]]) -> str:
    """A flat YAML mapping with a comment per key (values JSON-quoted: valid YAML scalars)."""
    out = []
    for key, value, comment in lines:
        if key.startswith("#"):
            out.append(key)
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, float):
            text = f"{value:.1e}"  # "1.0e-05": a float to YAML 1.1 readers (PyYAML), "1e-05" is not
        else:
            text = json.dumps(value) if isinstance(value, str) else str(value)
        out.append(f"{key}: {text}" + (f"  # {comment}" if comment else ""))
    return "\n".join(out) + "\n"


# -- writers ---------------------------------------------------------------------------------

def _write_llamafactory(ds: Any, out: Path, manifest: dict[str, Any], work: Path,
                        target: Path, model: str) -> ExportSummary:
    import datasets

    rows = _rows(ds)
    table = _label_table(rows, ("input_ids", "attention_mask", "labels"))
    _save_to_disk(datasets.DatasetDict({"train": datasets.Dataset(table)}), work / "tokenized")
    config = _yaml([
        ("# written by profit-prep export: ProFit masks as LLaMA-Factory tokenized data", 0, ""),
        ("# train: llamafactory-cli train llamafactory.yaml", 0, ""),
        ("model_name_or_path", model, "must share the tokenizer the data was scored with"),
        ("stage", "sft", ""),
        ("do_train", True, ""),
        ("finetuning_type", "full", ""),
        ("tokenized_path", str(target / "tokenized"), "the masks: labels are -100 where masked"),
        ("dataset", "profit_prep_export", "required by its argument check, never read"),
        ("dataset_dir", str(target), "no dataset_info.json: a missing tokenized_path fails "
         "instead of re-tokenising"),
        ("cutoff_len", _max_len(rows), "the longest exported row"),
        ("output_dir", "saves/profit-prep", ""),
        ("per_device_train_batch_size", 1, ""),
        ("learning_rate", 1.0e-5, ""),
        ("num_train_epochs", 1, ""),
        ("logging_steps", 1, ""),
        ("report_to", "none", ""),
    ])
    (work / "llamafactory.yaml").write_text(config)
    return _summary("llamafactory", rows)


def _write_axolotl(ds: Any, out: Path, manifest: dict[str, Any], work: Path, target: Path,
                   model: str) -> ExportSummary:
    rows = _rows(ds)
    table = _label_table(rows, ("input_ids", "attention_mask", "labels"))
    tmp = work / "data.parquet"
    pq.write_table(table, tmp)
    # axolotl caches prepared data by config, not by file content: a content hash in the file
    # name (so in the config) makes a regenerated export a new dataset, never stale data.
    name = f"data-{_content_hash(tmp)}.parquet"
    tmp.rename(work / name)
    config = "\n".join([
        "# written by profit-prep export: ProFit masks as axolotl pre-tokenized data",
        "# train: axolotl train axolotl.yaml",
        f"base_model: {json.dumps(model)}  # must share the tokenizer the data was scored with",
        "datasets:",
        f"  - path: {json.dumps(str(target / name))}  # the content hash is in the name: a "
        "regenerated export is never served from axolotl's prepared-data cache",
        "    ds_type: parquet  # no type: the columns input_ids, attention_mask, labels are "
        "used as they are",
        f"sequence_len: {_max_len(rows)}  # the longest exported row",
        "sample_packing: false",
        "val_set_size: 0",
        "output_dir: ./outputs/profit-prep",
        "micro_batch_size: 1",
        "gradient_accumulation_steps: 1",
        "num_epochs: 1",
        "learning_rate: 1.0e-5",
        "optimizer: adamw_torch",
        "logging_steps: 1",
        "",
    ])
    (work / "axolotl.yaml").write_text(config)
    return _summary("axolotl", rows)


def _write_hf(ds: Any, out: Path, manifest: dict[str, Any], work: Path, target: Path,
              model: str) -> ExportSummary:
    import datasets

    rows = _rows(ds)
    columns: tuple[str, ...] = ("input_ids", "attention_mask", "labels")
    if rows.weights is not None:
        columns += ("weights", "response_mask")  # for ProFitLossMixin (docs/trainers.md)
    _save_to_disk(datasets.Dataset(_label_table(rows, columns)), work / "dataset")
    weighted = rows.weights is not None
    (work / "train_hf.py").write_text(
        "# written by profit-prep export: labels are -100 where masked (any HF-style trainer)\n"
        "import datasets\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, "
        "Trainer, TrainingArguments\nfrom profit_prep.collate import PadCollator\n"
        + ("from profit_prep.losses import ProFitLossMixin\n" if weighted else "") + "\n"
        f"train = datasets.load_from_disk({str(target / 'dataset')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({model!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({model!r})\n"
        "args = TrainingArguments(output_dir='hf-out', remove_unused_columns=False)\n"
        + ("class ProFitTrainer(ProFitLossMixin, Trainer):  # reads weights, response_mask\n"
           "    pass\n\n" if weighted else "")
        + "# PadCollator pads by row length: with SmolLM2, pad == eos is a trained token\n"
        f"{'ProFitTrainer' if weighted else 'Trainer'}(model=model, args=args, "
        "train_dataset=train,\n"
        "        data_collator=PadCollator(pad_token_id=tokenizer.pad_token_id)).train()\n")
    return _summary("hf", rows)


def _write_trl(ds: Any, out: Path, manifest: dict[str, Any], work: Path, target: Path,
               model: str) -> ExportSummary:
    import datasets

    rows = _rows(ds)
    table = _label_table(rows, ("input_ids", "completion_mask"))
    _save_to_disk(datasets.Dataset(table), work / "dataset")
    (work / "train_trl.py").write_text(
        "# written by profit-prep export: pre-tokenized rows with completion_mask for TRL\n"
        "import datasets\nfrom trl import SFTConfig, SFTTrainer\n\n"
        f"train = datasets.load_from_disk({str(target / 'dataset')!r})\n"
        f"config = SFTConfig(output_dir='sft-out', max_length={_max_len(rows)},\n"
        "                   completion_only_loss=True)  # REQUIRED: else the mask is ignored\n"
        f"SFTTrainer(model={model!r}, args=config, train_dataset=train).train()\n")
    return _summary("trl", rows)


def _write_ms_swift(ds: Any, out: Path, manifest: dict[str, Any], work: Path, target: Path,
                    model: str) -> ExportSummary:
    from profit_prep.exports import swift as export_swift

    rows = _rows(ds)
    records, refused, kept = export_swift.build(out, manifest, rows.example_ids, rows.ids,
                                                  rows.keep, rows.response)
    tmp = work / "data.jsonl"
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    name = f"data-{_content_hash(tmp)}.jsonl"
    tmp.rename(work / name)
    (work / "ms-swift.sh").write_text(
        "# written by profit-prep export: assistant turns split at the mask's boundaries, each\n"
        "# piece with \"loss\": true/false (exact: every piece re-tokenises to its own ids)\n"
        f"swift sft --model {json.dumps(model)} --train_type full \\\n"
        f"    --dataset {json.dumps(str(target / name))} \\\n"
        "    --model_type MODEL_TYPE --template TEMPLATE  # a local model needs both\n")
    exported = set(kept)
    index = [i for i, e in enumerate(rows.example_ids) if e in exported]
    summary = _summary("ms-swift", rows, index, refused)
    # Its template trains what it appends after the final end of turn (chatml: "<|im_end|>\n"),
    # beyond any mask: count it so that it is said, not hidden.
    extra = sum(len(rows.response[i]) - 1 - int(np.flatnonzero(rows.response[i])[-1])
                for i in index)
    if extra:
        summary.note = (f"ms-swift also trains the {extra:,} template tokens after each row's "
                        "final end of turn (its suffix)")
    return summary


_WRITERS = {
    "llamafactory": _write_llamafactory,
    "axolotl": _write_axolotl,
    "ms-swift": _write_ms_swift,
    "hf": _write_hf,
    "trl": _write_trl,
}


# -- check -----------------------------------------------------------------------------------

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
    from profit_prep.rules import Select

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
        from profit_prep.exports import swift as export_swift

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
