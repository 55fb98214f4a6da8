"""The export driver: check the request and ``DEST``, load the masks, run the format's writer in
a folder beside ``DEST`` and rename it into place with its record (``profit_prep_export.json``)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from profit_prep.errors import InputError
from profit_prep.rules.profit import resolve_rule
from profit_prep.store.reader import read_manifest
from profit_prep.store.safe_files import sha256_file
from profit_prep.training.exports.writers import EXPORT_MANIFEST, WRITERS, ExportSummary
from profit_prep.training.loader import load

FORMATS = ("llamafactory", "axolotl", "ms-swift", "hf", "trl")
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
        summary = WRITERS[to](ds, out, manifest, work, target, model)
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
