"""One frontier plot from several `lazyllm-mlx eval --json` reports of one model (one column per
prompt length, as `eval --plot` draws a single report).

    python tools/plot_frontier.py benchmarks/smollm2-135m/eval_*k_layouts*.json --out frontier.png
"""

from __future__ import annotations

import argparse
import json

from lazyllm_mlx.evals.plots import plot_report


def merge(reports: list[dict]) -> dict:
    """The reports' rows in one report. Reports of one length must share their prompts (tasks,
    prompts per task, seed), so that every method's Δ pairs with the same baseline; a method
    measured twice at a length keeps the later report's row."""
    models = {r["model"] for r in reports}
    if len(models) != 1:
        raise SystemExit(f"plot_frontier: the reports are of different models: {sorted(models)}")
    merged = dict(reports[0], results=[], lengths=[])
    prompts: dict[int, tuple] = {}
    for report in reports:
        same = (tuple(report["tasks"]), report["num"], report["seed"])
        for length in report["lengths"]:
            if prompts.setdefault(length, same) != same:
                raise SystemExit(
                    f"plot_frontier: two reports at {length} tokens ran different prompts "
                    f"({prompts[length]} and {same}): their Δs pair with different baselines."
                )
        new = {(r["length"], r["method"]) for r in report["results"]}
        merged["results"] = [
            r for r in merged["results"] if (r["length"], r["method"]) not in new
        ] + report["results"]
        merged["lengths"] = sorted({*merged["lengths"], *report["lengths"]})
    merged["num_by_length"] = {length: same[1] for length, same in prompts.items()}
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
