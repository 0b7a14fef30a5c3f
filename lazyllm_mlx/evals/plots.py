"""PNG plots of `bench` (speed-up, tokens per layer) and `eval` (accuracy against speed-up).

matplotlib is the optional extra `plot`, imported only here. `python -m lazyllm_mlx.evals.plots
report.json out.png` redraws an eval plot from a saved report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STYLES = {  # eval method family -> (marker, color)
    "baseline": ("*", "black"),
    "none": ("X", "gray"),
    "lazy": ("o", "tab:blue"),
    "random": ("v", "tab:orange"),
    "static": ("s", "tab:green"),
}


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files, or a ValueError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "Plots need matplotlib: pip install 'lazyllm-mlx[plot]' (or pip install matplotlib)."
        ) from None
    return plt


def plot_speedup(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """TTFT speed-up over the baseline against prompt length, one line per schedule."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows if r["method"] != "baseline"})
    for method in methods:
        points = sorted((r["length"], r["speedup"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT speed-up over mlx-lm (×)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tokens_per_layer(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Tokens computed at each layer during one prefill (the paper's token-usage figure)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    length = max(r["length"] for r in rows)
    for row in rows:
        drawn = row["length"] == length and row.get("tokens_per_layer")
        # ";norevive" variants prefill exactly like their schedule: drawn once
        if drawn and "norevive" not in row["method"]:
            counts = row["tokens_per_layer"]
            fractions = [c / length for c in counts]
            ax.step(range(len(counts) + 1), fractions + fractions[-1:], where="post",
                    label=row["method"])  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"fraction of the {length} prompt tokens computed")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_report(report: dict[str, Any], path: str) -> None:
    """One panel per prompt length: each method's mean accuracy against its TTFT speed-up,
    methods of a family joined in order of speed-up."""
    plt = pyplot()
    lengths = report["lengths"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in report["results"] if r["length"] == length]
        for family, (marker, color) in STYLES.items():
            members = [r for r in rows if r["family"] == family]
            points = sorted((r["ttft_speedup"], r["accuracy"], r["method"]) for r in members)
            if not points:
                continue
            xs, ys, labels = zip(*points)
            line = "-" if len(points) > 1 else "none"
            ax.plot(xs, ys, marker=marker, color=color, label=family, markersize=8, linestyle=line)
            for x, y, label in points:
                ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        for r in rows:
            if r["family"] == "baseline":
                ax.axhline(r["accuracy"], color="black", linestyle=":", alpha=0.5)
        ax.set_title(f"{length}-token prompts")
        ax.set_xlabel("TTFT speed-up vs baseline (×, median per prompt)")
        ax.set_ylabel("accuracy, mean over tasks (points)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lazyllm-mlx eval: {Path(report.get('model', '')).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lazyllm_mlx.evals.plots report.json out.png", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        plot_report(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
