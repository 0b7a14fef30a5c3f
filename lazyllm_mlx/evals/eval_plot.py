"""Accuracy against TTFT speed-up (the Pareto plot) from an eval report; matplotlib is optional.

`python -m lazyllm_mlx.evals.eval_plot report.json out.png` redraws the plot from a saved report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STYLES = {  # family -> (marker, color)
    "baseline": ("*", "black"),
    "none": ("X", "gray"),
    "lazy": ("o", "tab:blue"),
    "random": ("v", "tab:orange"),
    "static": ("s", "tab:green"),
}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "Plotting needs matplotlib: pip install 'lazyllm-mlx[plot]' (or matplotlib)."
        ) from None


def plot_report(report: dict[str, Any], path: str) -> None:
    """One panel per prompt length: each method's mean accuracy against its TTFT speed-up,
    methods of a family joined in order of speed-up."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        print("usage: python -m lazyllm_mlx.evals.eval_plot report.json out.png", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        plot_report(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
