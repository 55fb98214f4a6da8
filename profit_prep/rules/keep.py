"""Which tokens a rule keeps: the one place every reader (``load``, ``inspect``, ``stats``,
``report``, ``export``, ``--compare``) resolves a rule against an output's manifest and applies it.

A reader resolves once (:func:`resolve`: the caller's
:class:`~profit_prep.rules.profit.RuleParams` or :class:`~profit_prep.rules.selection.Select`
against the manifest's stored rule), hands its tokens over as :class:`Tokens` (flat arrays, one
shard or the whole output) and gets the loss mask from :func:`kept`; a global top-k rule's
threshold comes from :func:`global_threshold_of` over every chunk of the output, so the k-th
token falls on the same token for every reader.

Example:
    >>> import numpy as np
    >>> manifest = {"mask": {"strategy": "higher", "tau": 0.1}, "render": {"end_of_turn_ids": []}}
    >>> resolved = resolve(manifest, RuleParams(tau=0.4))
    >>> lp = np.log(np.array([np.nan, 0.5, 0.3], dtype=np.float32))
    >>> tokens = Tokens(np.array([1, 2, 3]), np.array([False, True, True]), lp, np.array([3]),
    ...                 ["a"], np.zeros(3, dtype=bool))
    >>> kept(resolved, tokens).tolist()
    [False, True, False]
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from profit_prep.errors import InputError
from profit_prep.rules.profit import (
    MaskRule,
    RuleParams,
    apply_rule,
    end_of_turn_ids_of,
    end_of_turn_tokens,
    resolve_rule,
)
from profit_prep.rules.selection import Rule, Select, apply, global_threshold, signal_values

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Resolved:
    """A rule resolved against one output.

    ``rule``: what decides the mask (None: the stored ``loss_mask``); ``profit``: the ProFit rule
    in use (the stored one, with the caller's parameters), which views describe;
    ``end_of_turn_ids``: the ids kept in the loss whatever the rule (None: none).
    """

    rule: Rule
    profit: MaskRule
    end_of_turn_ids: list[int] | None = None

    @property
    def rethresholded(self) -> bool:
        """True when the mask is recomputed (not the stored ``loss_mask``)."""
        return self.rule is not None

    def describe(self) -> dict[str, Any] | None:
        """What decides the mask, as JSON (None: the stored mask): for cache keys and records."""
        if self.rule is None:
            return None
        return {"rule": self.rule.to_dict(), "type": type(self.rule).__name__,
                "end_of_turn_ids": self.end_of_turn_ids}


def rule_params(params: RuleParams | None = None, **given: Any) -> RuleParams:
    """``params``, or the rule parameters given as keywords (``load(out, tau=0.3)``), not both.

    >>> rule_params(tau=0.3).given()
    {'tau': 0.3}
    """
    if params is not None and given:
        raise TypeError(f"pass rule= or rule parameters {sorted(given)}, not both")
    return params if params is not None else RuleParams(**given)


def resolve(
    manifest: dict[str, Any], params: RuleParams | None = None, select: Select | None = None
) -> Resolved:
    """The rule a reader applies to an output with this manifest.

    Any parameter given recomputes the ProFit mask: the stored rule with those parameters
    replaced (:func:`profit_prep.rules.profit.resolve_rule`); none keeps the stored ``loss_mask``.
    ``select`` replaces the ProFit rule; it protects end-of-turn tokens only when ``protect`` is
    given, so other methods' rules stay as published. Refusals (a rule that cannot protect on
    this output, both kinds of rule) come here, before any token is read.
    """
    params = params or RuleParams()
    profit = resolve_rule(manifest.get("mask"), params)
    if select is not None:
        if set(params.given()) - {"protect"}:
            raise InputError("pass either select= or ProFit rule parameters, not both")
        eot = end_of_turn_ids_of(manifest, MaskRule(protect=params.protect)) \
            if params.protect else None
        return Resolved(select, profit, eot)
    if not params.given():
        return Resolved(None, profit)
    return Resolved(profit, profit, end_of_turn_ids_of(manifest, profit))


def resolve_parsed(manifest: dict[str, Any], rule: Rule) -> Resolved:
    """A rule already complete (``--compare``'s, from
    :func:`profit_prep.rules.selection.parse_rule`)."""
    stored = resolve_rule(manifest.get("mask"))
    if isinstance(rule, MaskRule):
        return Resolved(rule, rule, end_of_turn_ids_of(manifest, rule))
    return Resolved(rule, stored)


@dataclass
class Tokens:
    """Flat per-token arrays of some rows (one shard, or the whole output) and their lengths.

    ``example_ids``: a list, or an Arrow column (converted only for ``random``). ``signal``: the
    selection rule's stored signal per token, when it reads one.
    """

    input_ids: np.ndarray
    response: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    example_ids: Any
    stored_keep: np.ndarray
    signal: np.ndarray | None = None

    def ids(self) -> Sequence[str]:
        ids = self.example_ids
        return ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids)


def selection_values(rule: Select, tokens: Tokens) -> np.ndarray:
    """A selection rule's signal per token (float64): one mapping for every reader."""
    if rule.signal not in ("prob", "loss") and tokens.signal is None:
        raise InputError(f"signal {rule.signal!r} was not read for this rule")
    return signal_values(rule, tokens.logprobs, tokens.signal)


def needs_threshold(rule: Rule | None) -> bool:
    """True for a global top-k rule: its threshold spans the whole output."""
    return isinstance(rule, Select) and rule.kind == "top" and rule.scope == "global"


def global_threshold_of(rule: Rule | None, chunks: Iterable[Tokens]) -> float | None:
    """The exact threshold of a global top-k rule over every response token of ``chunks``;
    None, without reading ``chunks``, for any other rule (it needs none)."""
    if not needs_threshold(rule):
        return None
    assert isinstance(rule, Select)
    parts = [selection_values(rule, t)[np.asarray(t.response, dtype=bool)] for t in chunks]
    values = np.concatenate(parts) if parts else np.empty(0)
    return global_threshold(values, rule.fraction or 0.0, rule.largest)


def kept(resolved: Resolved, tokens: Tokens, threshold: float | None = None) -> np.ndarray:
    """The response tokens ``resolved`` keeps, over every token of ``tokens`` (bool).

    ``threshold``: a global top-k rule's, from :func:`global_threshold_of` over the whole output
    (never guessed from one chunk).
    """
    rule, response = resolved.rule, np.asarray(tokens.response, dtype=bool)
    if rule is None:
        return response & np.asarray(tokens.stored_keep, dtype=bool)
    if isinstance(rule, MaskRule):
        keep = apply_rule(rule, tokens.logprobs, response, lengths=tokens.lengths,
                          example_ids=tokens.ids() if rule.strategy == "random" else None)
    else:
        if needs_threshold(rule) and threshold is None:
            raise ValueError("a global top rule needs its threshold over the whole output")
        keep = apply(rule, selection_values(rule, tokens), response, tokens.lengths, threshold)
    if resolved.end_of_turn_ids is not None:
        keep = keep | end_of_turn_tokens(tokens.input_ids, response, resolved.end_of_turn_ids)
    return keep


def with_rule_keywords(func: F) -> F:
    """Show MaskRule's fields as ``func``'s keyword-only parameters (each None: "not given"),
    first after the positional ones: ``func`` takes them through ``**rule``, and ``help()``,
    ``inspect.signature`` and IDEs list them, declared by MaskRule alone."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    first = [p for p in own if p.kind is not p.KEYWORD_ONLY]
    hints = typing.get_type_hints(MaskRule)
    rule = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=hints[f.name] | None) for f in fields(MaskRule)]
    func.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*first, *rule, *(p for p in own if p.kind is p.KEYWORD_ONLY)]
    )
    return func
