"""PNG plots for `bench` (matplotlib is the optional extra `plot`: imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
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
    plt = _pyplot()
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
    plt = _pyplot()
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
