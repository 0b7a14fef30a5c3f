"""PNG plots of `bench` (speed-up, tokens per layer) and `eval` (the accuracy frontier).

matplotlib is the optional extra `plot`, imported only here. `python -m lazyllm_mlx.evals.plots
report.json out.png` redraws an eval plot from a saved report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..output_files import write_atomically


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


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a PNG whole, in place of `path` (a regular file or a new name only)."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


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
    save_figure(fig, path)
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
    save_figure(fig, path)
    plt.close(fig)


def _group(row: dict[str, Any]) -> str:
    """The plot's series of an eval row: its method family, lazy split by ranking rule."""
    if row["family"] != "lazy":
        return row["family"]
    from ..config import LazyConfig

    config = LazyConfig.parse(row["schedule"])
    return "lazy, paper's rule" if config.window == 1 and config.pool == 1 else "lazy, window rule"


GROUPS = {  # series -> (marker, color)
    "baseline": ("*", "black"),
    "none": ("X", "gray"),
    "lazy, paper's rule": ("o", "tab:purple"),
    "lazy, window rule": ("o", "tab:blue"),
    "random": ("v", "tab:orange"),
    "static": ("s", "tab:green"),
}


def plot_report(report: dict[str, Any], path: str) -> None:
    """The frontier, one column per prompt length. Top: accuracy minus the baseline's (paired,
    ± its standard error) against the prefill fraction, which carries over to any device.
    Bottom: this machine's TTFT speed-up against the same fraction, beside 1 / fraction."""
    plt = pyplot()
    lengths = report["lengths"]
    fig, axes = plt.subplots(
        2, len(lengths), figsize=(6 * len(lengths), 8.5), squeeze=False, sharex="col"
    )
    for column, length in enumerate(lengths):
        top, bottom = axes[0][column], axes[1][column]
        rows = [r for r in report["results"] if r["length"] == length]
        base = next(r["accuracy"] for r in rows if r["family"] == "baseline")
        for group, (marker, color) in GROUPS.items():
            members = sorted(
                (r for r in rows if _group(r) == group), key=lambda r: r["prefill_fraction"]
            )
            if not members:
                continue
            xs = [r["prefill_fraction"] for r in members]
            # older reports have no paired difference: the plain one, with no se
            deltas = [r.get("accuracy_delta", r["accuracy"] - base) for r in members]
            errors = [r.get("accuracy_delta_se", 0.0) for r in members]
            top.errorbar(xs, deltas, yerr=errors, marker=marker, color=color, label=group,
                         markersize=7, linestyle="none", capsize=3)  # fmt: skip
            bottom.plot(xs, [r["ttft_speedup"] for r in members], marker=marker, color=color,
                        label=group, markersize=7, linestyle="none")  # fmt: skip
            for r, x, y in zip(members, xs, deltas):
                if group.startswith("lazy"):
                    top.annotate(r["method"], (x, y), fontsize=6, xytext=(4, 4),
                                 textcoords="offset points")  # fmt: skip
        fractions = [0.25 + 0.75 * i / 50 for i in range(51)]
        bottom.plot(fractions, [1 / f for f in fractions], color="gray", linestyle=":",
                    label="1 / fraction (ideal)")  # fmt: skip
        top.axhline(0.0, color="black", linestyle=":", alpha=0.6)
        top.axhspan(-1.0, 1.0, color="black", alpha=0.06)
        num = report.get("num_by_length", {}).get(length, report.get("num", "?"))
        top.set_title(f"{length}-token prompts, {num} per task")
        top.set_ylabel("accuracy − baseline's (points, ± se)")
        bottom.set_ylabel("TTFT speed-up on this machine (×)")
        bottom.set_xlabel("prefill fraction (prompt token-layers computed)")
        top.invert_xaxis()  # faster to the right (the column shares its x axis)
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"lazyllm-mlx eval: {Path(report.get('model', '')).name}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
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
