"""The per-trainer writers of an export: each turns the loaded rows into the container and
columns its trainer reads, plus a config snippet, and returns an :class:`ExportSummary`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from profit_prep.store.safe_files import sha256_file
from profit_prep.store.schema import flat_list

EXPORT_MANIFEST = "profit_prep_export.json"


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
        "Trainer, TrainingArguments\nfrom profit_prep.training.collate import PadCollator\n"
        + ("from profit_prep.training.losses import ProFitLossMixin\n" if weighted else "") + "\n"
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
    from profit_prep.training.exports import swift as export_swift

    rows = _rows(ds)
    records, refused, kept = export_swift.build(out, manifest, rows.example_ids, rows.ids,
                                                  rows.keep, rows.response)
    tmp = work / "data.jsonl"
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    name = f"data-{_content_hash(tmp)}.jsonl"
    tmp.rename(work / name)
    (work / "ms-swift.sh").write_text(export_swift.script(model, str(target / name)))
    exported = set(kept)
    index = [i for i, e in enumerate(rows.example_ids) if e in exported]
    return _summary("ms-swift", rows, index, refused)


WRITERS = {
    "llamafactory": _write_llamafactory,
    "axolotl": _write_axolotl,
    "ms-swift": _write_ms_swift,
    "hf": _write_hf,
    "trl": _write_trl,
}
