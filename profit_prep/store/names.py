"""The names in an output folder: its files, and which of them profit-prep owns.

Only what :func:`own_file` accepts is ever removed (``--overwrite``); anything else there is
the user's (:func:`foreign_entries`), and a link or special file at an own name is refused
(:func:`unsafe_entries`); :func:`check_own_folder` says whether a run may write a folder.

Layout::

    OUT/
      run.json               parameters of the run (a rerun must match them, or --overwrite)
      .lock                  held while a run writes; a second run is refused
      data/part-00000.parquet  rows whose source_index is in [0, shard_size)
      data/part-00001.parquet  ... one file per input range, even when every row was rejected
      rejected/part-00000.jsonl  rejected rows of that range (example_id, source_index, reason)
      rejected.jsonl         all rejected rows, gathered at the end
      shards/part-00000.json  that shard's record: checksums of its files and of run.json
      manifest.json          written last: counts, per-shard row counts and checksums
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from profit_prep.errors import InputError
from profit_prep.store.safe_files import not_ours

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


# What profit-prep writes into an output folder (and so the only things --overwrite removes).
_OWN_TOP = {"run.json", MANIFEST, ".lock", REJECTED, "report.html"}
OWN_IN = {"data": re.compile(r"part-\d{5}\.parquet"), "rejected": re.compile(r"part-\d{5}\.jsonl"),
          "shards": re.compile(r"part-\d{5}\.json")}
# Temporaries of atomic writes (8 random characters after the name).
OWN_TEMP = re.compile(r"\.(run\.json|manifest\.json|rejected\.jsonl|report\.html|"
                      r"part-\d{5}\.(parquet|jsonl|json))\.[A-Za-z0-9_]{8}")


def own_file(folder: str | None, name: str) -> bool:
    if OWN_TEMP.fullmatch(name):
        return True
    if folder is None:
        return name in _OWN_TOP
    return bool(OWN_IN[folder].fullmatch(name))


def foreign_entries(path: Path) -> list[Path]:
    """Everything in an output folder that profit-prep does not write (links count as foreign)."""
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name in OWN_IN and entry.is_dir() and not entry.is_symlink():
            foreign += [f for f in sorted(entry.iterdir())
                        if f.is_symlink() or not f.is_file() or not own_file(entry.name, f.name)]
        elif entry.is_symlink() or not entry.is_file() or not own_file(None, entry.name):
            foreign.append(entry)
    return foreign


def unsafe_entries(path: Path) -> list[tuple[Path, int]]:
    """Entries at profit-prep's own names that it must not write, lock or delete: a link, or
    the wrong kind (a FIFO named ``.lock``, a file named ``data``). With their ``st_mode``."""
    unsafe = []
    for entry in sorted(path.iterdir()):
        mode = entry.lstat().st_mode
        if entry.name in OWN_IN:
            if not stat.S_ISDIR(mode):
                unsafe.append((entry, mode))
                continue
            for f in sorted(entry.iterdir()):
                inner = f.lstat().st_mode
                if own_file(entry.name, f.name) and not stat.S_ISREG(inner):
                    unsafe.append((f, inner))
        elif own_file(None, entry.name) and not stat.S_ISREG(mode):
            unsafe.append((entry, mode))
    return unsafe


def check_own_folder(path: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding anything profit-prep did not
    write (with ``--overwrite`` too: it would delete the user's files), or a link or special
    file at one of profit-prep's own names (always: it would write or delete through it)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is a file, not a directory; choose a folder")
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    unsafe = unsafe_entries(path)
    if unsafe:
        where, mode = unsafe[0]
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        wanted = "a folder" if where.name in OWN_IN and where.parent == path else "a file"
        raise InputError(str(not_ours(where, mode, wanted)) + more)
    foreign = foreign_entries(path)
    marked = (path / "run.json").exists() or (path / MANIFEST).exists()
    if not marked and any(e.name != ".lock" for e in entries):
        raise InputError(
            f"{path} is not empty and holds no profit-prep output (no run.json); "
            "profit-prep writes only into a new or empty folder: choose another --out"
        )
    if foreign and overwrite:
        shown = ", ".join(str(f.relative_to(path)) for f in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise InputError(
            f"{path} holds files profit-prep did not write ({shown}{more}); "
            "--overwrite removes only its own files: move those, or choose another --out"
        )
