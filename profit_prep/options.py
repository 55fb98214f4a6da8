"""Options declared once, as dataclass fields, for the Python API and the CLI alike.

A field's ``metadata`` says everything about it (TRL style): ``help`` (the ``--flag``'s help),
``choices`` (the values allowed; argparse refuses others before a command starts, and
:func:`check_choices` refuses them in the Python API with the same list) and ``aliases`` (more
option strings for its ``--flag``).

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Paint:
    ...     colour: str = field(default="red", metadata={"help": "hue",
    ...                                                   "choices": ("red", "blue")})
    ...     def __post_init__(self) -> None:
    ...         check_choices(self)
    >>> Paint("green")
    Traceback (most recent call last):
    ...
    profit_prep.errors.InputError: unknown colour 'green' (choose from red, blue)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from profit_prep.errors import InputError


def choices_of(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values a field allows (None: any value of its type)."""
    choices = f.metadata.get("choices")
    return tuple(choices) if choices else None


def check_choices(obj: Any) -> None:
    """Refuse a field value outside its declared ``choices`` (None means "not given")."""
    for f in dataclasses.fields(obj):
        choices = choices_of(f)
        value = getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            raise InputError(f"unknown {f.name} {value!r} (choose from "
                             f"{', '.join(map(str, choices))})")


def field_type(cls: type, name: str) -> Any:
    """A field's type without ``| None`` (``float | None`` -> ``float``)."""
    kind = typing.get_type_hints(cls)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def include_fields(source: type, *, after: str) -> Callable[[type], type]:
    """Class decorator (under ``@dataclass``): ``source``'s fields, declared there once, become
    fields of the decorated class too, placed after its field ``after`` (positional order kept).

    A fresh :func:`dataclasses.field` per field: same default, same metadata.
    """

    def decorate(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        hints = typing.get_type_hints(source)
        merged: dict[str, Any] = {}
        for name, kind in own.items():
            merged[name] = kind
            if name == after:
                for f in dataclasses.fields(source):
                    merged[f.name] = hints[f.name]
                    setattr(cls, f.name, dataclasses.field(default=f.default,
                                                           metadata=f.metadata))
        if after not in own:
            raise TypeError(f"include_fields: {cls.__name__} has no field {after!r}")
        cls.__annotations__ = merged
        return cls

    return decorate


def optional_dataclass(
    source: type, name: str, doc: str, methods: dict[str, Callable[..., Any]] | None = None
) -> type:
    """A frozen dataclass with ``source``'s fields, each ``None`` by default ("not given"):
    overrides of a ``source`` value, declared by ``source`` alone. Values outside a field's
    ``choices`` are refused on construction."""
    hints = typing.get_type_hints(source)
    spec = [(f.name, hints[f.name] | None,
             dataclasses.field(default=None, metadata=f.metadata))
            for f in dataclasses.fields(source)]
    cls = dataclasses.make_dataclass(name, spec, frozen=True, kw_only=True,
                                     namespace={"__doc__": doc, "__post_init__": check_choices,
                                                **(methods or {})})
    cls.__module__ = source.__module__
    return cls


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    optional: bool = False,
    default_note: str = "",
    drop_flags: Sequence[str] = (),
    sections: dict[str, Sequence[str]] | None = None,
) -> None:
    """One ``--flag`` per field of ``cls`` (with its ``help``, ``choices`` and ``aliases``).

    Fields without a default become required. ``optional=True``: every flag defaults to None
    ("not given"), ``default_note`` says what that means. ``drop_flags``: option strings the
    command uses otherwise. ``sections`` (title -> field names, each field once): one argument
    group per section, in that order.
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    if sections is None:
        groups = [(parser, list(by_name))]
    else:
        groups = [(parser.add_argument_group(title), list(names))
                  for title, names in sections.items()]
    for target, names in groups:
        for name in names:
            _add_field(target, cls, by_name[name], optional, default_note, drop_flags)


def _add_field(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    f: dataclasses.Field,
    optional: bool,
    default_note: str,
    drop_flags: Sequence[str],
) -> None:
    flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
    flags = [flag for flag in flags if flag not in drop_flags]
    kind = field_type(cls, f.name)
    has_default = f.default is not dataclasses.MISSING
    help_text = f.metadata.get("help", "")
    if kind is bool:
        parser.add_argument(*flags, action="store_true", help=help_text, dest=f.name,
                            default=None if optional else False)
        return
    if optional:
        help_text += f" ({default_note})" if default_note else ""
    elif has_default and f.default is not None:
        help_text += f" (default: {f.default})"
    choices = choices_of(f)
    parser.add_argument(
        *flags,
        dest=f.name,
        type=kind,
        required=not has_default and not optional,
        default=None if optional or not has_default else f.default,
        choices=choices,
        help=help_text,
        metavar=None if choices else f.name.upper(),
    )


def values_of(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of ``cls``'s fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
