"""Revival against no revival on the same prompts: two `lazyllm-mlx eval --json` reports (one with
the schedule, one with the schedule plus `;norevive`), paired by prompt.

    python tools/compare_decoding_modes.py revive.json norevive.json "15:0.4,19:0.5;w=64"
"""

from __future__ import annotations

import argparse
import json
import statistics

from lazyllm_mlx.evals.scores import paired_accuracy_delta


def instances(report: dict, method: str) -> dict:
    rows = [r for r in report["results"] if r["method"] == method]
    if not rows:
        raise SystemExit(f"compare_decoding_modes: no method {method!r} in the report")
    return {(i["task"], i["index"]): i for i in rows[0]["instances"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revive", help="eval JSON with the schedule (and the baseline)")
    parser.add_argument("norevive", help="eval JSON with the schedule;norevive")
    parser.add_argument("schedule")
    args = parser.parse_args()
    with open(args.revive, encoding="utf-8") as f:
        first = json.load(f)
    with open(args.norevive, encoding="utf-8") as f:
        second = json.load(f)
    revive = instances(first, args.schedule)
    norevive = instances(second, args.schedule + ";norevive")
    base = instances(first, "baseline")
    keys = [k for k in norevive if k in revive and k in base]
    tasks: dict[str, list] = {}
    for key in keys:
        tasks.setdefault(key[0], []).append(key)
    print(f"{len(keys)} prompts in both reports")
    print(f"{'method':<10}" + "".join(f"{t:>9}" for t in tasks) + f"{'mean':>8}{'cont.':>8}")
    for name, runs in (("baseline", base), ("revive", revive), ("norevive", norevive)):
        scores = [100 * statistics.fmean(runs[k]["score"] for k in ks) for ks in tasks.values()]
        cont = statistics.fmean(runs[k].get("continuation", 1.0) for k in keys)
        print(f"{name:<10}" + "".join(f"{s:>9.1f}" for s in scores)
              + f"{statistics.fmean(scores):>8.1f}{cont:>8.0%}")  # fmt: skip
    delta, se = paired_accuracy_delta([norevive[k] for k in keys], [revive[k] for k in keys])
    same = sum(norevive[k]["output"] == revive[k]["output"] for k in keys)
    print(f"norevive - revive: {delta:+.1f} ± {se:.1f} points (paired, "
          f"task-averaged); identical outputs {same} of {len(keys)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
