"""The terminal view (``profit-prep inspect``): examples with masked tokens marked, coloured by
probability, by a stored column, or by two rules compared; plain markers when not a terminal.

Example:
    >>> for text in render_examples(load_flat("demo-out"), tok, limit=1, color=False):
    ...     print(text)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.rules.selection import Rule
from profit_prep.views.colors import Scale, color_scale
from profit_prep.views.flat import (
    A_ONLY,
    B_ONLY,
    BOTH,
    CATEGORY_NAMES,
    NEITHER,
    PROB,
    Comparison,
    Flat,
    compare_rules,
)
from profit_prep.views.text import describe_any, describe_rule, token_strings, visible

# -- terminal view ---------------------------------------------------------------------------

RESET = "\x1b[0m"
PROMPT_STYLE = "\x1b[90m"  # grey
MASKED_STYLE = "\x1b[9;1;38;5;196;48;5;52m"  # struck, bold red on dark red
TOP1_STYLE = "\x1b[2;3m"  # dim italic
# Kept response tokens: red (unlikely) .. green (likely), 256-colour foregrounds.
PROB_STEPS = ((0.05, 196), (0.1, 202), (0.2, 208), (0.4, 214), (0.6, 220), (0.8, 148), (1.01, 40))


def _prob_style(p: float) -> str:
    for upper, code in PROB_STEPS:
        if p < upper:
            return f"\x1b[38;5;{code}m"
    return f"\x1b[38;5;{PROB_STEPS[-1][1]}m"  # NaN


def example_stats(flat: Flat, i: int) -> dict[str, Any]:
    """Counts of one example under the mask in use."""
    s = flat.row(i)
    n_resp = int(flat.response[s].sum())
    n_kept = int(flat.keep[s].sum())
    return {
        "tokens": s.stop - s.start,
        "response": n_resp,
        "kept": n_kept,
        "masked": n_resp - n_kept,
        "masked_fraction": (n_resp - n_kept) / n_resp if n_resp else 0.0,
    }


def example_counts(flat: Flat, i: int, comparison: Comparison | None = None) -> str:
    """``132 tokens · 62 response · 55 kept · 11.3% masked`` (with ``comparison``: tokens kept
    by both rules, A only, ...), ``· truncated`` when cut: the one caption of an example that
    the terminal view and the report both show."""
    st = example_stats(flat, i)
    if comparison is None:
        counts = f"{st['kept']} kept · {st['masked_fraction']:.1%} masked"
    else:
        counts = " · ".join(f"{k} {v}" for k, v in comparison.counts(flat.row(i)).items())
    trunc = " · truncated" if flat.truncated[i] else ""
    return f"{st['tokens']} tokens · {st['response']} response · {counts}{trunc}"


def example_header(flat: Flat, i: int, comparison: Comparison | None = None) -> str:
    return (f"example {visible(flat.example_ids[i])} (source row {int(flat.source_index[i])}) · "
            f"{example_counts(flat, i, comparison)}")


def example_tokens(
    flat: Flat, i: int, tokenizer: Any
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """One example's token texts, probabilities, response and masked flags, and the top-1 text
    of each masked token (when stored): what both the terminal view and the report draw.

    Texts are :func:`visible`: control characters in the data show as escapes (``\\x1b``)."""
    s = flat.row(i)
    pieces = [visible(p) for p in token_strings(tokenizer, flat.input_ids[s])]
    # Slice before computing: the whole-output properties would cost O(all tokens) per example.
    probs = np.exp(flat.logprobs[s].astype(np.float64))
    resp = flat.response[s]
    masked = resp & ~flat.keep[s]
    top1 = None
    if flat.top1 is not None:
        top1 = [visible(t) for t in token_strings(tokenizer, flat.top1[s][masked])]
    return pieces, probs, resp, masked, top1


# Quantile buckets, lowest first: blue .. yellow (256-colour foregrounds).
SCALE_CODES = (63, 33, 37, 114, 220)
STRIKE = "\x1b[9m"
COMPARE_STYLES = {
    BOTH: "\x1b[38;5;40m",  # green: kept either way
    A_ONLY: "\x1b[1;38;5;33m",  # bold blue
    B_ONLY: "\x1b[1;38;5;208m",  # bold orange
    NEITHER: MASKED_STYLE,
}
COMPARE_PLAIN = {A_ONLY: "{A:", B_ONLY: "{B:", NEITHER: "["}
CLOSE_PLAIN = {A_ONLY: "}", B_ONLY: "}", NEITHER: "]"}


def _scale_style(scale: Scale, bucket: int, struck: bool = False) -> str:
    """ANSI style of a token in ``bucket`` of ``scale`` (-1: no value, uncoloured)."""
    colour = [f"38;5;{SCALE_CODES[scale.shade(bucket)]}"] if bucket >= 0 else []
    codes = (["9"] if struck else []) + colour
    return f"\x1b[{';'.join(codes)}m" if codes else ""


def _plain(text: str) -> tuple[str, str]:
    """(text with line breaks written ``\\n``, the breaks themselves): marked tokens stay on one
    line and the text still breaks where the token does."""
    return text.replace("\n", "\\n"), "\n" * text.count("\n")


def format_value(v: float) -> str:
    """A per-token value as the views print it: whole numbers (``rank``) exactly, others to 4
    significant digits, ``nan`` when missing.

    >>> format_value(46722.0), format_value(-2.0937), format_value(float("nan"))
    ('46722', '-2.094', 'nan')
    """
    if not np.isfinite(v):
        return "nan"
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def render_example(
    flat: Flat,
    i: int,
    tokenizer: Any,
    *,
    color: bool,
    scale: Scale | None = None,
    comparison: Comparison | None = None,
) -> str:
    """One example as terminal text.

    Default (no ``scale``, no ``comparison``), without colour: prompt and kept tokens as plain
    text, each masked token as ``[text]`` with newlines inside shown as ``\\n`` (the line break
    itself follows the bracket); with a ``top1_id`` column, ``[text|top-1 text]``. With colour:
    prompt grey, response tokens coloured red..green by probability, masked tokens struck
    through in red.

    ``scale``: response tokens coloured by the quantile bucket of ``scale.column`` (masked ones
    also struck through); plain, every response token is followed by its value, ``text{0.693}``.

    ``comparison``: response tokens kept by both rules plain (green), kept by A only
    ``{A:text}`` (blue), by B only ``{B:text}`` (orange), by neither ``[text]`` (struck red).
    """
    pieces, probs, resp, masked, top1 = example_tokens(flat, i, tokenizer)
    s = flat.row(i)
    category = comparison.category[s] if comparison is not None else None
    values = flat.column(scale.column)[s] if scale is not None else None
    buckets = scale.bucket(values) if scale is not None else None
    out: list[str] = []
    k = 0
    for j, (text, p, r, m) in enumerate(zip(pieces, probs, resp, masked, strict=True)):
        alt = None
        if m:
            alt = top1[k] if top1 is not None else None
            k += 1
        if not r:
            out.append(f"{PROMPT_STYLE}{text}{RESET}" if color else text)
        elif category is not None:
            c = int(category[j])
            if c == BOTH:
                out.append(f"{COMPARE_STYLES[c]}{text}{RESET}" if color else text)
            elif color:
                shown = text.replace("\n", "↵") or "∅"
                out.append(f"{COMPARE_STYLES[c]}{shown}{RESET}{chr(10) * text.count(chr(10))}")
            else:
                body, breaks = _plain(text)
                out.append(f"{COMPARE_PLAIN[c]}{body}{CLOSE_PLAIN[c]}{breaks}")
        elif buckets is not None and values is not None:
            if color:
                shown = (text.replace("\n", "↵") or "∅") if m else text
                extra = f"{TOP1_STYLE}({alt}){RESET}" if alt is not None else ""
                breaks = "\n" * text.count("\n") if m else ""
                out.append(
                    f"{_scale_style(scale, int(buckets[j]), bool(m))}{shown}{RESET}{extra}{breaks}"
                )
            else:
                body, breaks = _plain(text)
                if m:
                    body = f"[{body}|{_plain(alt)[0]}]" if alt is not None else f"[{body}]"
                out.append(f"{body}{{{format_value(float(values[j]))}}}{breaks}")
        elif m:
            if color:
                shown = text.replace("\n", "↵") or "∅"
                extra = f"{TOP1_STYLE}({alt}){RESET}" if alt is not None else ""
                out.append(f"{MASKED_STYLE}{shown}{RESET}{extra}{chr(10) * text.count(chr(10))}")
            else:
                body, breaks = _plain(text)
                alt_text = f"|{_plain(alt)[0]}" if alt is not None else ""
                out.append(f"[{body}{alt_text}]{breaks}")
        else:
            out.append(f"{_prob_style(float(p))}{text}{RESET}" if color else text)
    return "".join(out)


def select_examples(
    flat: Flat,
    tokenizer: Any,
    *,
    row: str | None = None,
    grep: str | None = None,
    limit: int | None = 5,
) -> list[int]:
    """Indices of the examples to show: one id, those whose text contains ``grep``, or the first.

    ``grep`` is case-insensitive and matches the decoded conversation text.
    """
    if row is not None:
        for ids in (flat.example_ids, [visible(e) for e in flat.example_ids]):
            if row in ids:  # the raw id, or the id as the views print it (escapes)
                return [ids.index(row)]
        raise InputError(f"no example with id {row!r} in this output")
    picked: list[int] = []
    pattern = re.compile(re.escape(grep), re.IGNORECASE) if grep else None
    for i in range(flat.n_examples):
        if limit is not None and len(picked) >= limit:
            break
        if pattern is not None:
            text = tokenizer.decode(flat.input_ids[flat.row(i)], skip_special_tokens=False)
            if not pattern.search(text):
                continue
        picked.append(i)
    return picked


def _legend(
    flat: Flat, color: bool, scale: Scale | None, comparison: Comparison | None
) -> Iterator[str]:
    how = "re-thresholded" if flat.rethresholded else "stored"
    mask = f"mask: {describe_rule(flat.rule)} ({how})"
    if comparison is not None:
        a, b = describe_any(comparison.a), describe_any(comparison.b)
        if color:
            keys = " · ".join(
                f"{COMPARE_STYLES[c]}{name}{RESET}" for c, name in enumerate(CATEGORY_NAMES)
            )
            yield f"compare: A = {a} · B = {b} · {PROMPT_STYLE}prompt{RESET} · kept by {keys}"
        else:
            yield (
                f"compare: A = {a} · B = {b} · text = kept by both · {{A:text}} = kept by A "
                "only · {B:text} = kept by B only · [text] = kept by neither"
            )
        return
    if scale is None:
        if color:
            steps = " ".join(f"{_prob_style(u - 1e-9)}<{u:g}{RESET}" for u, _ in PROB_STEPS[:-1])
            yield (
                f"{mask} · {PROMPT_STYLE}prompt{RESET} · {MASKED_STYLE}masked{RESET} · "
                f"response p: {steps} {_prob_style(1.0)}high{RESET}"
            )
        else:
            yield f"{mask} · [token] = masked response token"
        return
    n = int(np.isfinite(flat.column(scale.column)[flat.response].astype(np.float64)).sum())
    column = visible(scale.column)  # a column name of the Parquet files
    if color:
        yield f"{mask} · {PROMPT_STYLE}prompt{RESET} · {STRIKE}masked{RESET} (struck through)"
        shades = " ".join(
            f"{_scale_style(scale, b)}■ {r}{RESET}" for b, r in enumerate(scale.ranges())
        )
    else:
        yield f"{mask} · [token] = masked response token · token{{v}} = its {column}"
        shades = " · ".join(f"q{b} {r}" for b, r in enumerate(scale.ranges()))
    yield f"{column} by quantile over {n} response tokens: {shades}"


def render_examples(
    flat: Flat,
    tokenizer: Any,
    *,
    row: str | None = None,
    grep: str | None = None,
    limit: int | None = 5,
    color: bool = False,
    color_by: str = PROB,
    compare: tuple[Rule, Rule] | None = None,
) -> Iterator[str]:
    """The terminal view, one block of text at a time (a legend, then one block per example).

    ``color_by``: ``prob`` (masked vs kept, coloured by probability) or a per-token column read
    into ``flat`` (:func:`color_scale`). ``compare``: two rules (:func:`parse_rule`) whose kept
    tokens are contrasted, with per-example counts in each header.
    """
    if compare is not None and color_by != PROB:
        raise InputError("--color-by and --compare both decide token colours; choose one")
    scale = color_scale(flat, color_by) if color_by != PROB else None
    comparison = compare_rules(flat, *compare) if compare is not None else None
    picked = select_examples(flat, tokenizer, row=row, grep=grep, limit=limit)
    yield "\n".join(_legend(flat, color, scale, comparison))
    for i in picked:
        bar = "─" * 3
        head = example_header(flat, i, comparison)
        yield f"\n{bar} {head} {bar}" if not color else f"\n\x1b[1m{bar} {head} {bar}{RESET}"
        yield render_example(flat, i, tokenizer, color=color, scale=scale, comparison=comparison)
    if not picked:
        yield "no matching examples"
    else:
        yield f"\n({len(picked)} of {flat.n_examples} examples shown)"
    if comparison is not None:
        total = " · ".join(f"{k} {v}" for k, v in comparison.counts().items())
        yield f"all {flat.n_examples} examples, response tokens kept by: {total}"
