"""Which writer an ``--out`` gets: a local folder (``OutputDir``) or an object-store prefix
(``ObjectOutput``), both an :class:`~profit_prep.store.output_base.Output`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from profit_prep.store.output_base import Output
from profit_prep.store.urls import is_url
from profit_prep.store.writer import OutputDir


def open_output(out: str | Path) -> Output:
    """The writer for ``out``: URLs (s3://, gs://) go to the object-store writer, whose
    clients are imported only then."""
    if is_url(str(out)):
        from profit_prep.store.objects import ObjectOutput

        return ObjectOutput(str(out))
    return OutputDir(out)


def read_run_params(out: str | Path) -> dict[str, Any]:
    """The parameters an output at ``out`` was started with; {} for none (or a damaged one:
    the writer says so in one line when the run opens it)."""
    if is_url(str(out)):
        from profit_prep.store.objects import read_run_params as read_remote

        return read_remote(str(out))
    try:
        params = json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}
