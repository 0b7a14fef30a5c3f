"""Two methods of one `lazyllm-mlx eval --json` report against each other, paired by prompt:
B minus A in points with its standard error, identical outputs, and each one's prefill fraction.

    python tools/compare_methods.py report.json "8:1536,15:0.4,19:0.5;w=64" "15:1024,19:0.38;w=64"
"""

from __future__ import annotations

import argparse
import json
import statistics

from lazyllm_mlx.evals.scores import by_prompt, paired_accuracy_delta


def instances(report: dict, method: str) -> dict:
    rows = [r for r in report["results"] if r["method"] == method]
    if not rows:
        names = ", ".join(r["method"] for r in report["results"])
        raise SystemExit(f"compare_methods: no method {method!r} in the report ({names})")
    return by_prompt(rows[0]["instances"])


def compare(report: dict, first: str, second: str) -> dict:
    a, b = instances(report, first), instances(report, second)
    keys = [k for k in a if k in b]
    delta, se = paired_accuracy_delta([b[k] for k in keys], [a[k] for k in keys])
    return dict(
        prompts=len(keys),
        delta=delta,
        se=se,
        identical=sum(a[k]["output"] == b[k]["output"] for k in keys),
        prefill=[statistics.fmean(runs[k]["prefill_fraction"] for k in keys) for runs in (a, b)],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="eval JSON holding both methods")
    parser.add_argument("first", help="method A (its label in the report)")
    parser.add_argument("second", help="method B")
    args = parser.parse_args()
    with open(args.report, encoding="utf-8") as f:
        result = compare(json.load(f), args.first, args.second)
    print(f"{result['prompts']} prompts: B - A {result['delta']:+.1f} ± {result['se']:.1f} points "
          f"(paired, task-averaged); identical outputs {result['identical']}; prefill fraction "
          f"A {result['prefill'][0]:.3f}, B {result['prefill'][1]:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
