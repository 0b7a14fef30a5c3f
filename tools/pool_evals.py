"""One eval report from several on disjoint prompts of the same tasks: each method's rows pooled
and summarized again (paired Δ ± se, agreement, speed-ups), as if one run had done them all.

    lazyllm-mlx eval ... --num 20 --seed 11 --json a.json
    lazyllm-mlx eval ... --num 30 --first-prompt 20 --seed 11 --json b.json
    python tools/pool_evals.py a.json b.json --json pooled.json

Methods missing from a report are left out (and named); the same prompt in two reports is an error.
TTFT ratios stay per prompt, so pooling reports run on different days keeps them meaningful.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from lazyllm_mlx.cli.eval import write_json
from lazyllm_mlx.evals.run import summarize_records

MUST_MATCH = ("model", "tasks", "seed", "chat_template", "num_layers")
IDENTITY = ("method", "family", "schedule", "matched_to")


def pool(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The pooled report; raises ValueError where the reports cannot be pooled."""
    first = reports[0]
    for key in MUST_MATCH:
        values = {json.dumps(r.get(key)) for r in reports}
        if len(values) > 1:
            raise ValueError(f"the reports differ in {key}: {', '.join(sorted(values))}")
    if any(r.get("partial") for r in reports):
        raise ValueError("a report is partial (its run did not finish)")
    lengths = sorted(set.intersection(*(set(r["lengths"]) for r in reports)))
    results, left_out = [], set()
    for length in lengths:
        rows = [
            {row["method"]: row for row in r["results"] if row["length"] == length} for r in reports
        ]
        methods = [m for m in rows[0] if all(m in by_method for by_method in rows)]
        left_out |= {m for by_method in rows for m in by_method if m not in methods}
        keys = [
            (i["task"], i["index"])
            for by_method in rows
            for i in by_method["baseline"]["instances"]
        ]
        repeated = [k for k, n in Counter(keys).items() if n > 1]
        if repeated:
            raise ValueError(f"prompt {repeated[0][0]}#{repeated[0][1]} is in more than one report")
        merged = {m: [i for by_method in rows for i in by_method[m]["instances"]] for m in methods}
        none = merged.get("none")
        for m in methods:
            identity = {k: rows[0][m][k] for k in IDENTITY}
            summary = summarize_records(identity, merged[m], merged["baseline"], none)
            results.append(dict(length=length, **summary))
    per_task = Counter(i["task"] for i in results[0]["instances"]) if results else Counter()
    return dict(
        model=first["model"],
        command="python tools/pool_evals.py " + " ".join(r["command"] for r in reports),
        pooled_from=[r["command"] for r in reports],
        python=first["python"],
        date=max(r["date"] for r in reports),
        num_layers=first["num_layers"],
        chat_template=first["chat_template"],
        lengths=lengths,
        tasks=first["tasks"],
        num=min(per_task.values()) if per_task else 0,
        seed=first["seed"],
        left_out=sorted(left_out),
        results=results,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="eval JSONs on disjoint prompts")
    parser.add_argument("--json", help="write the pooled report here")
    args = parser.parse_args(argv)
    try:
        reports = []
        for path in args.reports:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        pooled = pool(reports)
    except (OSError, ValueError, KeyError) as error:
        print(f"pool_evals: {error}", file=sys.stderr)
        return 2
    for row in pooled["results"]:
        print(
            f"{row['length']:>6} {row['method']:<24} n={len(row['instances']):>3} "
            f"acc {row['accuracy']:6.1f}  Δ {row['accuracy_delta']:+6.1f} ± "
            f"{row['accuracy_delta_se']:.1f}  first token {row['first_token']:.0%}  "
            f"KL {row['kl']:.3f}  frac {row['prefill_fraction']:.3f}  "
            f"TTFT ×{row['ttft_speedup']:.2f}"
        )
    if pooled["left_out"]:
        print(f"not in every report, left out: {', '.join(pooled['left_out'])}")
    if args.json:
        write_json(args.json, pooled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
