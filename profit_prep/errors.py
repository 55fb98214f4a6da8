"""The two kinds of errors users see.

``InputError`` stops a run with one clear line (the CLI prints it without a traceback).
``RowError`` rejects one row: the run goes on and the row lands in ``rejected.jsonl``.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's arguments or files that stops the whole run."""


class RowError(ValueError):
    """A problem with one input row; the reason is recorded next to the row's id."""
