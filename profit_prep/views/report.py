"""A self-contained HTML report of an output: statistics, plots and browsable masked examples.

One file, nothing fetched at view time: plots are inline SVG (matplotlib, Agg backend), CSS and
JavaScript are inline. Examples are a seeded random sample (``examples``, default 200) so the file
stays small for large outputs; the page shows them ``per_page`` (default 20) at a time.

Example:
    >>> write_report("demo-out", "demo-out/report.html")  # doctest: +SKIP
    PosixPath('demo-out/report.html')
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from profit_prep.errors import InputError
from profit_prep.rules.keep import rule_params
from profit_prep.rules.profit import RuleParams
from profit_prep.rules.selection import Rule, rule_columns
from profit_prep.store.safe_files import atomic_write_bytes, write_user_file
from profit_prep.views.colors import Scale, color_scale
from profit_prep.views.flat import (
    BOTH,
    CATEGORY_NAMES,
    PROB,
    Comparison,
    Flat,
    check_columns,
    compare_rules,
    load_flat,
    load_output_tokenizer,
    numeric_columns,
)
from profit_prep.views.plots import make_plots
from profit_prep.views.report_assets import CSS, ERROR_HOOK, JS
from profit_prep.views.stats import compute_stats
from profit_prep.views.terminal import example_counts, example_stats, example_tokens, format_value
from profit_prep.views.text import describe_any, describe_rule, token_strings, visible

PROB_BUCKETS = 10  # kept-token colour classes p0 .. p9
# Token classes of a comparison, by category (BOTH, A_ONLY, B_ONLY, NEITHER).
CATEGORY_CLASSES = ("cmp-both", "cmp-a", "cmp-b", "cmp-none")



def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct example indices out of ``n`` (all when ``n <= k``), seeded, in order.

    >>> sample_indices(5, 10, 0).tolist()
    [0, 1, 2, 3, 4]
    >>> len(sample_indices(1000, 3, 0))
    3
    """
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


# -- examples --------------------------------------------------------------------------------


def _title(p: float, masked: bool, signals: dict[str, float], top1: str | None) -> str:
    """A token's tooltip: p, masked or not, every stored signal, the top-1 token's text."""
    text = f"p={p:.4f}" if np.isfinite(p) else "p=n/a"
    if masked:
        text += " · masked"
    text += "".join(f" · {k}={format_value(v)}" for k, v in signals.items())
    if top1 is not None:
        text += f" · top-1: {top1!r}"
    return visible(text)


def example_html(
    flat: Flat,
    i: int,
    tokenizer: Any,
    *,
    scale: Scale | None = None,
    comparison: Comparison | None = None,
) -> str:
    """One example: prompt runs greyed, response tokens coloured, masked ones marked.

    Colours: by p (default), by the quantile bucket of ``scale.column`` (class ``q0``..``q4``,
    the value in ``data-v``), or by which of two rules keep the token (``cmp-both``, ``cmp-a``,
    ``cmp-b``, ``cmp-none``). The tooltip shows p and every column in ``flat.signals``.
    """
    pieces, probs, resp, masked, _ = example_tokens(flat, i, tokenizer)
    s = flat.row(i)
    buckets = np.clip(
        (np.nan_to_num(probs, nan=0.0) * PROB_BUCKETS).astype(int), 0, PROB_BUCKETS - 1
    )
    signals = {k: v[s] for k, v in flat.signals.items() if k != "logprobs"}
    values = flat.column(scale.column)[s] if scale is not None else None
    q = scale.bucket(values) if scale is not None and values is not None else None
    category = comparison.category[s] if comparison is not None else None
    top1 = None
    if flat.top1 is not None:  # the model's own choice, on every response token
        top1 = iter(token_strings(tokenizer, flat.top1[s][resp]))
    parts: list[str] = []
    prompt_run: list[str] = []
    for j, text in enumerate(pieces):
        if not resp[j]:
            prompt_run.append(text)  # prompt tokens: one span per run keeps the file small
            continue
        if prompt_run:
            parts.append(f'<span class="prompt">{html.escape("".join(prompt_run))}</span>')
            prompt_run = []
        alt = next(top1) if top1 is not None else None
        title = _title(
            float(probs[j]), bool(masked[j]), {k: float(v[j]) for k, v in signals.items()}, alt
        )
        attrs = f'title="{html.escape(title, quote=True)}"'
        if category is not None:
            cls = CATEGORY_CLASSES[int(category[j])]
            marked = int(category[j]) != BOTH
        elif q is not None and values is not None:
            shade = f"q{scale.shade(int(q[j]))}" if scale is not None and q[j] >= 0 else ""
            cls = f"masked qv {shade}" if masked[j] else shade
            attrs += f' data-v="{format_value(float(values[j]))}"'
            marked = bool(masked[j])
        else:
            cls = "masked" if masked[j] else f"p{buckets[j]}"
            marked = bool(masked[j])
        shown = html.escape(text.replace("\n", "↵\n") or "∅") if marked else html.escape(text)
        parts.append(f'<span class="{" ".join(["tok", *cls.split()])}" {attrs}>{shown}</span>')
    if prompt_run:
        parts.append(f'<span class="prompt">{html.escape("".join(prompt_run))}</span>')
    st = example_stats(flat, i)
    eid = html.escape(visible(flat.example_ids[i]), quote=True)
    data = "" if comparison is None else "".join(
        f' data-{k.replace(" ", "-").lower()}="{v}"' for k, v in comparison.counts(s).items())
    return (
        f'<section class="example" id="ex-{eid}" data-masked="{st["masked_fraction"]:.4f}"{data}>'
        f'<h3>example {eid} <span class="st">· source row {int(flat.source_index[i])} · '
        f"{example_counts(flat, i, comparison)}</span></h3>"
        f'<pre class="text">{"".join(parts)}</pre></section>'
    )


# -- page ------------------------------------------------------------------------------------


def _legend(scale: Scale | None, comparison: Comparison | None) -> tuple[str, str]:
    """The colour legend (HTML) and a short name of what the colours show."""
    if comparison is not None:
        a, b = describe_any(comparison.a), describe_any(comparison.b)
        counts = comparison.counts()
        keys = "".join(
            f'<span class="tok {c}">{html.escape(n)} ({counts[n]})</span>'
            for c, n in zip(CATEGORY_CLASSES, CATEGORY_NAMES)
        )
        return (
            f"A = <code>{html.escape(a)}</code> · B = <code>{html.escape(b)}</code> · "
            f"response tokens kept by {keys}",
            f"which rule keeps them (A = {a}, B = {b})",
        )
    if scale is not None:
        keys = "".join(
            f'<span class="tok q{scale.shade(k)}">{html.escape(r)}</span>'
            for k, r in enumerate(scale.ranges())
        )
        column = visible(scale.column)
        return (
            f"{html.escape(column)} by quantile over the output's response tokens: {keys}",
            column,
        )
    return (
        "".join(
            f'<span class="tok p{b}">p&lt;{(b + 1) / PROB_BUCKETS:.1f}</span>'
            for b in range(PROB_BUCKETS)
        ),
        "probability",
    )


def _table(head: list[str], rows: list[list[Any]], numeric: set[int]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{html.escape(visible(str(v)))}</td>'
            if c in numeric
            else f"<td>{html.escape(visible(str(v)))}</td>"
            for c, v in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _numbers_html(stats: dict[str, Any]) -> str:
    """The report's tables: the threshold sweep, per-example shares, top masked/kept tokens."""
    per = stats["per_example_masked_fraction"]
    quantiles = [[k, "n/a" if v is None else f"{v:.1%}"] for k, v in per["quantiles"].items()]

    def top_rows(key: str) -> list[list[Any]]:
        return [[repr(t["token"]), t["token_id"], t["count"]] for t in stats[key]]

    return f"""<h2>Numbers</h2>
<div class="tables">
<div><h3>Threshold sweep (<code>higher</code>)</h3>{
        _table(
            ["tau", "masked tokens", "masked %"],
            [
                [f"{p['tau']:g}", p["masked_tokens"], f"{p['masked_fraction']:.1%}"]
                for p in stats["threshold_sweep"]["points"]
            ],
            {1, 2},
        )
    }</div>
<div><h3>Per-example masked share</h3>{_table(["quantile", "masked %"], quantiles, {1})}
<p class="note">mean {"n/a" if per["mean"] is None else f"{per['mean']:.1%}"}</p></div>
<div><h3>Most often masked</h3>{_table(["token", "id", "count"], top_rows("top_masked"), {1, 2})}
</div>
<div><h3>Most often kept</h3>{_table(["token", "id", "count"], top_rows("top_kept"), {1, 2})}</div>
</div>"""


def _cards_html(stats: dict[str, Any]) -> str:
    cards = [
        (stats["examples"], "examples"),
        (stats["tokens"], "tokens"),
        (stats["response_tokens"], "response tokens"),
        (stats["kept_tokens"], "kept"),
        (f"{stats['masked_fraction']:.1%}", "masked (of response)"),
    ]
    end = stats["end_of_turn"]
    if end["tokens"]:
        cards.append((f"{end['masked']} of {end['tokens']}", "end-of-turn tokens masked"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{html.escape(str(v))}</b><span>{html.escape(k)}</span></div>'
        for v, k in cards
    ) + "</div>"


def _plots_html(stats: dict[str, Any]) -> str:
    plots = make_plots(stats)
    per = stats["per_example_masked_fraction"]
    return f"""<h2>Plots</h2>
<div class="plots">
<figure class="plot" id="plot-probability">{plots["probability_histogram"]}
<figcaption>Probability of response tokens (20 bins); red bars fall below tau.</figcaption></figure>
<figure class="plot" id="plot-sweep">{plots["sweep"]}
<figcaption>Masked share of response tokens if the mask were <code>higher</code> at each tau.
</figcaption></figure>
<figure class="plot" id="plot-per-example">{plots["per_example"]}
<figcaption>Per-example masked share ({per["examples_with_response"]} examples with a response).
</figcaption></figure>
</div>"""


def _document(out: str | Path, body: str, stats: dict[str, Any], n_shown: int,
              per_page: int) -> str:
    """The whole page around ``body``: head, inline CSS and scripts, the summary as JSON."""
    summary = {
        k: stats[k]
        for k in ("examples", "tokens", "response_tokens", "kept_tokens", "masked_fraction")
    }
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>profit-prep report · {html.escape(visible(str(out)))}</title>"
        f"<script>{ERROR_HOOK}</script><style>{CSS}</style></head>\n"
        f'<body data-examples="{n_shown}" data-per-page="{per_page}">{body}'
        f'<script type="application/json" id="stats">'
        f"{json.dumps(summary).replace('<', chr(92) + 'u003c')}</script>"
        f"<script>{JS.replace('PER_PAGE', str(int(per_page)))}</script></body></html>\n"
    )



def build_html(
    flat: Flat,
    tokenizer: Any,
    *,
    out: str | Path = "",
    examples: int = 200,
    sample_seed: int = 0,
    per_page: int = 20,
    color_by: str = PROB,
    compare: tuple[Rule, Rule] | None = None,
) -> str:
    """The report page as one HTML string.

    ``color_by`` and ``compare`` choose the token colours as in
    :func:`profit_prep.views.terminal.render_examples`; the column must be in ``flat.signals``.
    """
    if compare is not None and color_by != PROB:
        raise InputError("--color-by and --compare both decide token colours; choose one")
    scale = color_scale(flat, color_by) if color_by != PROB else None
    comparison = compare_rules(flat, *compare) if compare is not None else None
    stats = compute_stats(flat, tokenizer)
    picked = sample_indices(flat.n_examples, examples, sample_seed)
    manifest = flat.manifest
    model = visible(str(manifest.get("model", {}).get("name", "?")))  # the manifest's text
    rule = f"{describe_rule(flat.rule)} ({stats['rule_source']})"
    sample_note = (
        f"all {flat.n_examples} examples"
        if len(picked) == flat.n_examples
        else f"{len(picked)} of {flat.n_examples} examples, a seeded random sample "
        f"(seed {sample_seed}), in source order"
    )
    legend, colours = _legend(scale, comparison)
    masked_note = (
        ""
        if comparison is not None
        else ', <span class="tok masked">masked</span> tokens are struck through in red'
    )
    body = f"""
<h1>profit-prep report</h1>
<p class="meta">output <code>{html.escape(visible(str(out)))}</code>
 · model <code>{html.escape(model)}</code> · mask <code>{html.escape(rule)}</code>
 · tokens coloured by <code id="colour-by">{html.escape(colours)}</code></p>
{_cards_html(stats)}
{_plots_html(stats)}
{_numbers_html(stats)}
<h2 id="examples">Examples</h2>
<p class="note">Showing {html.escape(sample_note)}; {per_page} per page. Prompt tokens are grey,
response tokens are coloured by {html.escape(colours)}{masked_note}; hover a token for its
probability and every stored signal.</p>
<p class="legend note">{legend}</p>
<div class="controls">
<button id="prev" type="button">&larr; prev</button><span id="pageinfo"></span>
<button id="next" type="button">next &rarr;</button>
<input id="filter" type="search" placeholder="filter examples by text">
<label><input id="onlymasked" type="checkbox"> hide prompts</label>
</div>
<div id="example-list">{
        "".join(
            example_html(flat, int(i), tokenizer, scale=scale, comparison=comparison)
            for i in picked
        )
    }</div>
"""
    return _document(out, body, stats, len(picked), per_page)


def write_report(
    out: str | Path,
    html_path: str | Path | None = None,
    *,
    examples: int = 200,
    sample_seed: int = 0,
    per_page: int = 20,
    tokenizer: Any | None = None,
    tokenizer_path: str | Path | None = None,
    color_by: str = PROB,
    compare: tuple[Rule, Rule] | None = None,
    rule: RuleParams | None = None,
    **params: Any,
) -> Path:
    """Write the HTML report of output ``out`` (default ``OUT/report.html``; for an output on an
    object store, in its local copy) and return its path.

    Every stored signal column is read, for the tooltips; ``color_by`` must be one of them,
    ``logprobs`` or ``prob``. ``sample_seed`` samples the examples shown (``report --seed``);
    ``rule`` (or MaskRule's fields as keywords, ``seed`` the random strategy's) re-thresholds the
    mask as :func:`~profit_prep.views.flat.load_flat` does.
    """
    from profit_prep.store.cache import local_output

    out = local_output(out)
    check_columns(out, [color_by])
    rule_cols = [c for r in compare or () for c in rule_columns(r)]
    columns = [*numeric_columns(out), *rule_cols]
    flat = load_flat(out, rule=rule_params(rule, **params), columns=columns)
    if tokenizer is None:
        tokenizer = load_output_tokenizer(out, tokenizer_path)
    page = build_html(flat, tokenizer, out=out, examples=examples, sample_seed=sample_seed,
                      per_page=per_page, color_by=color_by, compare=compare)
    if html_path:  # the user's path: a link or device there is written through, never replaced
        target = Path(html_path)
        write_user_file(target, page.encode())
    else:  # inside OUT: a link or special file at report.html is refused, never followed
        target = Path(out) / "report.html"
        atomic_write_bytes(target, page.encode())  # readable as the umask allows, like any file
    return target
