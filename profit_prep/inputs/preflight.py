"""Checks of the input against the chosen format and chat template on its first rows, before
any row is scored: a file no row of which can be read as its format, or a template that fails on
all of them, is one :class:`InputError`, not every row rejected."""

from __future__ import annotations

from profit_prep.config import ScoreConfig
from profit_prep.errors import InputError, RowError
from profit_prep.inputs.formats import (
    FORMATS,
    FieldMap,
    detect_format,
    detect_row_format,
    required_columns,
    row_tools,
    to_messages,
)
from profit_prep.inputs.sources import RawRow, Source
from profit_prep.rendering.renderer import Renderer


def check_format(source: Source, config: ScoreConfig) -> str:
    """The format every row is read as, or ``auto`` (each row's own,
    :func:`profit_prep.job.render_rows`).

    ``auto`` with ``--prompt-field``/``--response-field`` is ``fields``. A plain ``auto`` input
    must have a row of a known format among its first 50 readable rows: if none has, the file
    is refused with one line rather than every row rejected.
    """
    fields = config.fields()
    if config.format not in FORMATS:
        raise InputError(f"unknown --format {config.format!r} (choose from {', '.join(FORMATS)})")
    if config.format == "fields" and not (config.prompt_field and config.response_field):
        raise InputError("--format fields needs --prompt-field and --response-field")
    readable = [r for r in source.read(0, min(len(source), 50)) if r.data is not None]
    if not readable:
        raise InputError(f"{config.data}: no readable rows among the first 50")
    first = readable[0]
    if config.format == "auto" and not (fields.prompt_field or fields.response_field):
        for row in readable:
            try:
                detect_format(row.data, fields)
                return "auto"
            except InputError:
                continue
        detect_format(first.data, fields)  # raises, naming the first row's columns
    fmt = detect_format(first.data, fields) if config.format == "auto" else config.format
    missing = [c for c in required_columns(fmt, fields) if c not in first.data]
    if missing:
        raise InputError(
            f"{config.data}: column {missing[0]!r} not found for format {fmt} "
            f"(row {first.index} has: {', '.join(sorted(first.data))})"
        )
    return fmt


def check_template(renderer: Renderer, source: Source, fmt: str, fields: FieldMap) -> None:
    """A chat template that cannot be compiled, or that fails on every one of the first 50
    readable rows, is one :class:`InputError` before scoring, not every row rejected."""
    renderer.check_template()
    failed: list[tuple[RawRow, str]] = []
    for row in source.read(0, min(len(source), 50)):
        if row.data is None:
            continue
        try:
            row_fmt = detect_row_format(row.data, fields) if fmt == "auto" else fmt
            messages, tools = to_messages(row.data, row_fmt, fields), row_tools(row.data)
        except RowError:
            continue  # a row the template never sees
        try:
            renderer.render_text(messages, tools)
            return
        except RowError as exc:
            failed.append((row, str(exc)))
        except RecursionError:
            continue
    if failed:
        row, reason = failed[0]
        raise InputError(f"{reason} on every row tried ({len(failed)} of the first rows; row "
                         f"{row.index} shown): fix the chat template")
