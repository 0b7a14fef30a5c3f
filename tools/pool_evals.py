"""One eval report from several on disjoint prompts of the same tasks: each method's rows pooled
and summarized again (paired Δ ± se, agreement, speed-ups), as if one run had done them all.

    lazyllm-mlx eval ... --num 20 --seed 11 --json a.json
    lazyllm-mlx eval ... --num 30 --first-prompt 20 --seed 11 --json b.json
    python tools/pool_evals.py a.json b.json --json pooled.json

A method (its family and resolved schedule: a preset and its schedule string are one) is pooled
over the reports that ran it, each prompt paired with the baseline of its own report; a prompt
that two reports ran with the same output counts once, with different outputs it is an error.
TTFT ratios stay per prompt, so pooling reports run on different days keeps them meaningful.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from lazyllm_mlx.cli.eval import print_table
from lazyllm_mlx.evals.run import summarize_records
from lazyllm_mlx.output_files import write_json

MUST_MATCH = ("model", "tasks", "seed", "chat_template", "num_layers")
IDENTITY = ("method", "family", "schedule", "matched_to")


def _pool_method(key, reports_rows: list[dict[str, dict]]) -> tuple[dict, list, list, list | None]:
    """One method's identity, instances, and the baseline's (and none's) on the same prompts,
    gathered from every report that ran it. A prompt run again with the same output (a baseline
    from the cache) counts once; with another output it is an error."""
    holding = [rows for rows in reports_rows if key in rows]
    records, base, none, seen = [], [], [], {}
    for rows in holding:
        by_family = {family: row for (family, _), row in rows.items()}
        none_runs = by_family["none"]["instances"] if "none" in by_family else None
        baselines = by_family["baseline"]["instances"]
        for i, (record, baseline) in enumerate(zip(rows[key]["instances"], baselines)):
            prompt = (record["task"], record["index"])
            if prompt in seen:
                if seen[prompt] != record["output"]:
                    raise ValueError(
                        f"prompt {prompt[0]}#{prompt[1]} of {key[1]} is in two reports with "
                        "different outputs"
                    )
                continue
            seen[prompt] = record["output"]
            records.append(record)
            base.append(baseline)
            none = none + [none_runs[i]] if none is not None and none_runs else None
    # A preset's name and its resolved schedule are one method: the shorter label names it.
    label = min((rows[key]["method"] for rows in holding), key=len)
    identity = {k: holding[0][key][k] for k in IDENTITY} | {"method": label}
    return identity, records, base, none


def pool(reports: list[dict[str, Any]], command: str = "tools/pool_evals.py") -> dict[str, Any]:
    """The pooled report, each method over every report that ran it (matched by its family and
    resolved schedule); raises ValueError where the reports cannot be pooled."""
    first = reports[0]
    for key in MUST_MATCH:
        values = {json.dumps(r.get(key)) for r in reports}
        if len(values) > 1:
            raise ValueError(f"the reports differ in {key}: {', '.join(sorted(values))}")
    if any(r.get("partial") for r in reports):
        raise ValueError("a report is partial (its run did not finish)")
    lengths = sorted({length for r in reports for length in r["lengths"]})
    results = []
    for length in lengths:
        reports_rows = [
            {
                (row["family"], row["schedule"]): row
                for row in r["results"]
                if row["length"] == length
            }
            for r in reports
        ]
        reports_rows = [rows for rows in reports_rows if rows]
        keys = list(dict.fromkeys(k for rows in reports_rows for k in rows))
        for key in keys:
            identity, records, base, none = _pool_method(key, reports_rows)
            results.append(dict(length=length, **summarize_records(identity, records, base, none)))
    per_task = Counter(i["task"] for i in results[0]["instances"]) if results else Counter()
    return dict(
        model=first["model"],
        command=command,
        pooled_from=[r["command"] for r in reports],
        python=first["python"],
        date=max(r["date"] for r in reports),
        num_layers=first["num_layers"],
        chat_template=first["chat_template"],
        lengths=lengths,
        tasks=first["tasks"],
        num=min(per_task.values()) if per_task else 0,  # the baseline's prompts per task
        seed=first["seed"],
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
        pooled = pool(reports, "python tools/pool_evals.py " + " ".join(args.reports))
    except (OSError, ValueError, KeyError) as error:
        print(f"pool_evals: {error}", file=sys.stderr)
        return 2
    print_table(pooled)
    print("\nprompts pooled per method (a method as its resolved schedule):")
    for row in pooled["results"]:
        print(f"  {row['length']} {row['method']} ({row['schedule']}): {len(row['instances'])}")
    if args.json:
        write_json(args.json, pooled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
