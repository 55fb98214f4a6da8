"""Bar chart of each scoring path's throughput as a ratio to the naive loop, from run.py's JSON.

Run::

    python benchmarks/plot.py benchmarks/latest.json docs/img/benchmark_speedup.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PATHS = {
    "naive": "naive loop",
    "transformers": "ours: transformers",
    "transformers_compile": "ours: + torch.compile",
    "vllm": "vLLM (CPU, fp32)",
    "vllm_bf16": "vLLM (CPU, bf16)",
    "bf16": "transformers bf16",
}


def plot(res: dict[str, Any], png: Path) -> None:
    """Write the chart; paths without a figure (null) are listed as absent, not drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and PNG is all we need
    import matplotlib.pyplot as plt

    naive = res["naive_tokens_per_s"]
    names, ratios, absent = [], [], []
    for key, label in PATHS.items():
        value = res.get(f"{key}_tokens_per_s")
        if value:
            names.append(f"{label}\n{value:,.0f} tok/s")
            ratios.append(value / naive)
        elif key != "bf16" or res.get("machine", {}).get("avx512_bf16"):
            absent.append(label)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    colors = ["#999999"] + ["#3b75af"] * (len(ratios) - 1)
    bars = ax.barh(names[::-1], ratios[::-1], color=colors[::-1])
    ax.bar_label(bars, labels=[f"{r:.2f}x" for r in ratios[::-1]], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1.8, color="#c0392b", lw=0.8, ls="--", label="target 1.8x")
    ax.set_xlim(0, max(ratios + [1.8]) * 1.25)
    ax.set_xlabel("throughput / naive loop (same rows, same run)")
    m = res.get("machine", {})
    title = f"{res.get('model_kind', '')} scoring, {m.get('cores')} cores {m.get('cpu_model')}"
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    if absent:
        fig.text(0.01, 0.01, "not measured: " + ", ".join(absent), fontsize=7, color="#555555")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("png", type=Path, nargs="?", default=Path("docs/img/benchmark_speedup.png"))
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.png)


if __name__ == "__main__":
    main()
