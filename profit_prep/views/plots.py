"""The report's plots as inline SVG (matplotlib, Agg): the probability histogram with tau, the
threshold sweep, the per-example masked share. Nothing is fetched when the page is viewed."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline SVG in HTML


def make_plots(stats: dict[str, Any]) -> dict[str, str]:
    """Three inline SVG plots: probability histogram, sweep curve, per-example distribution."""
    # Figure objects, not pyplot: no global backend or figure state (safe in notebooks/threads).
    import matplotlib

    rule = stats["rule"]
    tau = rule.get("tau") if rule["strategy"] in ("higher", "lower") else None
    # Text as text (smaller SVG); a fixed hash salt keeps ids stable between runs.
    with matplotlib.rc_context(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "profit-prep",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    ):
        return {
            "probability_histogram": _svg(_probability_histogram(stats, tau)),
            "sweep": _svg(_sweep(stats, tau)),
            "per_example": _svg(_per_example(stats)),
        }


def _axes() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0))
    return fig, fig.subplots()


def _probability_histogram(stats: dict[str, Any], tau: float | None) -> Any:
    hist = stats["probability_histogram"]
    edges = np.array(hist["edges"])
    fig, ax = _axes()
    colours = [
        "#b91c1c" if tau is not None and hi <= tau + 1e-12 else "#2563eb" for hi in edges[1:]
    ]
    ax.bar(
        edges[:-1],
        hist["counts"],
        width=np.diff(edges),
        align="edge",
        color=colours,
        edgecolor="white",
        linewidth=0.5,
    )
    if tau is not None:
        ax.axvline(tau, color="#111", linestyle="--", linewidth=1)
        ax.text(tau, ax.get_ylim()[1] * 0.95, f" tau={tau:g}", va="top", fontsize=8)
    ax.set_xlabel("p(token) under the reference model")
    ax.set_ylabel("response tokens")
    ax.set_xlim(0, 1)
    return fig


def _sweep(stats: dict[str, Any], tau: float | None) -> Any:
    points = stats["threshold_sweep"]["points"]
    fig, ax = _axes()
    taus = [pt["tau"] for pt in points]
    ax.plot(taus, [100 * pt["masked_fraction"] for pt in points], marker="o", color="#b91c1c")
    for pt in points:
        ax.annotate(
            f"{pt['masked_fraction']:.0%}",
            (pt["tau"], 100 * pt["masked_fraction"]),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=7,
        )
    if tau is not None:
        ax.axvline(tau, color="#111", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(taus, [f"{t:g}" for t in taus], rotation=45)
    ax.minorticks_off()
    ax.set_ylim(0, 105)
    ax.set_xlabel("tau (keep p >= tau)")
    ax.set_ylabel("masked response tokens (%)")
    return fig


def _per_example(stats: dict[str, Any]) -> Any:
    per = stats["per_example_masked_fraction"]["histogram"]
    edges = 100 * np.array(per["edges"])
    fig, ax = _axes()
    ax.bar(
        edges[:-1],
        per["counts"],
        width=np.diff(edges),
        align="edge",
        color="#7c3aed",
        edgecolor="white",
        linewidth=0.5,
    )
    ax.set_xlabel("masked share of an example's response tokens (%)")
    ax.set_ylabel("examples")
    ax.set_xlim(0, 100)
    return fig
