"""One frontier plot from several `lazyllm-mlx eval --json` reports of one model (one column per
prompt length, as `eval --plot` draws a single report).

    python tools/plot_frontier.py benchmarks/frontier_smollm2_*k.json --out frontier.png
"""

from __future__ import annotations

import argparse
import json

from lazyllm_mlx.evals.plots import plot_report


def merge(reports: list[dict]) -> dict:
    """The reports' rows in one report; a length measured twice keeps the later report's rows."""
    models = {r["model"] for r in reports}
    if len(models) != 1:
        raise SystemExit(f"plot_frontier: the reports are of different models: {sorted(models)}")
    merged = dict(reports[0], results=[], lengths=[])
    for report in reports:
        for length in report["lengths"]:
            merged["results"] = [r for r in merged["results"] if r["length"] != length]
        merged["results"] += report["results"]
        merged["lengths"] = sorted({*merged["lengths"], *report["lengths"]})
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="eval JSON files of one model")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    reports = []
    for path in args.reports:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    plot_report(merge(reports), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
