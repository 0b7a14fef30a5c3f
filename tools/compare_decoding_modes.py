"""Revival against another decoding mode on the same prompts: two `lazyllm-mlx eval --json`
reports (one with the schedule, one with the schedule plus the mode's options, `;norevive` unless
--mode says otherwise), paired by prompt.

    python tools/compare_decoding_modes.py revive.json norevive.json "15:0.4,19:0.5;w=64"
    python tools/compare_decoding_modes.py revive.json margin.json "15:0.4,19:0.5" --mode margin=0.5
"""

from __future__ import annotations

import argparse
import json
import statistics

from lazyllm_mlx.evals.scores import by_prompt, paired_accuracy_delta


def instances(report: dict, method: str) -> dict:
    rows = [r for r in report["results"] if r["method"] == method]
    if not rows:
        raise SystemExit(f"compare_decoding_modes: no method {method!r} in the report")
    return by_prompt(rows[0]["instances"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revive", help="eval JSON with the schedule (and the baseline)")
    parser.add_argument("other", help="eval JSON with the schedule;MODE")
    parser.add_argument("schedule")
    parser.add_argument("--mode", default="norevive", help="the options the other report adds")
    args = parser.parse_args()
    with open(args.revive, encoding="utf-8") as f:
        first = json.load(f)
    with open(args.other, encoding="utf-8") as f:
        second = json.load(f)
    revive = instances(first, args.schedule)
    other = instances(second, f"{args.schedule};{args.mode}")
    base = instances(first, "baseline")
    keys = [k for k in other if k in revive and k in base]
    tasks: dict[str, list] = {}
    for key in keys:
        tasks.setdefault(key[0], []).append(key)
    print(f"{len(keys)} prompts in both reports")
    width = max(10, len(args.mode) + 1)
    print(f"{'method':<{width}}" + "".join(f"{t:>9}" for t in tasks) + f"{'mean':>8}{'cont.':>8}")
    for name, runs in (("baseline", base), ("revive", revive), (args.mode, other)):
        scores = [100 * statistics.fmean(runs[k]["score"] for k in ks) for ks in tasks.values()]
        cont = statistics.fmean(runs[k].get("continuation", 1.0) for k in keys)
        print(f"{name:<{width}}" + "".join(f"{s:>9.1f}" for s in scores)
              + f"{statistics.fmean(scores):>8.1f}{cont:>8.0%}")  # fmt: skip
    delta, se = paired_accuracy_delta([other[k] for k in keys], [revive[k] for k in keys])
    same = sum(other[k]["output"] == revive[k]["output"] for k in keys)
    print(f"{args.mode} - revive: {delta:+.1f} ± {se:.1f} points (paired, "
          f"task-averaged); identical outputs {same} of {len(keys)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
