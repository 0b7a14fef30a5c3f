"""Markdown tables for BENCHMARKS.md from the JSON that `lazyllm-mlx bench` and `eval` write.

    python tools/benchmarks_md.py bench benchmarks/smollm2-135m/bench_1k_2k_4k_none_paper.json
    python tools/benchmarks_md.py eval benchmarks/smollm2-135m/eval_4k_default_40.json

Prints the table and the command that produced the JSON, to paste under a heading.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lazyllm_mlx.evals.scores import by_prompt, paired_accuracy_delta


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def bench_table(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}` — {report['model']}, {report['device']}, median of "
        f"{report['runs']} runs after a warm-up, {report['max_tokens']} generated tokens per run.",
        "",
        "| tokens | method | TTFT s | × baseline | ideal × | measured ÷ ideal | prefill fraction "
        "| decode tok/s, first 16 | × baseline | decode tok/s, all | × baseline "
        "| prompt + 16 × baseline | prompt + all × baseline | peak GB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        cells = [
            str(r["length"]),
            f"`{r['method']}`",
            _fmt(r["ttft"], ".2f"),
            _fmt(r.get("speedup"), ".2f"),
            _fmt(r.get("ideal_speedup"), ".2f"),
            _fmt(r.get("measured_over_ideal"), ".2f"),
            _fmt(r.get("prefill_fraction"), ".3f"),
            _fmt(r.get("short_decode_tps"), ".1f"),  # absent from reports of older versions
            _fmt(r.get("short_decode_vs_baseline"), ".2f"),
            _fmt(r["generation_tps"], ".1f"),
            _fmt(r.get("decode_vs_baseline"), ".2f"),
            _fmt(r.get("short_total_speedup"), ".2f"),
            _fmt(r.get("total_speedup"), ".2f"),
            _fmt(r["peak_memory_gb"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _baseline_instances(instances: list[dict], base: list[dict]) -> list[dict]:
    """The baseline's instance for each of a method's, by prompt: a pooled report may hold methods
    run on fewer prompts than the baseline. Reports without prompt indices pair by position."""
    if all("index" in i for i in instances + base):
        base_of = by_prompt(base)
        return [base_of[(i["task"], i["index"])] for i in instances]
    return base


def eval_table(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = [
        f"`{report['command']}` — {report['num']} prompts per task and length, seed "
        f"{report['seed']}, Python {report['python']}.",
    ]
    for length in report["lengths"]:
        lines += [
            "",
            f"**{length}-token prompts**",
            "",
            "| method | prefill | " + " | ".join(tasks) + " | mean | Δ ± se | 1st token | "
            "1st where right | KL | continuation | TTFT × |",
            "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [r for r in report["results"] if r["length"] == length]
        base = next(r for r in rows if r["method"] == "baseline")
        for r in rows:
            paired = _baseline_instances(r["instances"], base["instances"])
            delta, se = paired_accuracy_delta(r["instances"], paired)
            agree = [i["first_token"] for i, b in zip(r["instances"], paired) if b["score"] >= 0.5]
            scores = [_fmt(r["scores"].get(t), ".1f") for t in tasks]
            cells = [
                f"`{r['method']}`",
                _fmt(r["prefill_fraction"], ".3f"),
                *scores,
                _fmt(r["accuracy"], ".1f"),
                f"{delta:+.1f} ± {se:.1f}",
                _fmt(100 * r["first_token"], ".0f") + " %",
                (_fmt(100 * sum(agree) / len(agree), ".0f") + " %") if agree else "-",
                _fmt(r["kl"], ".3f"),
                _fmt(100 * r["continuation"], ".0f") + " %",
                _fmt(r["ttft_speedup"], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("search", {}).get("best"):
        best = report["search"]["best"]
        lines += [
            "",
            f"Fastest within {report['search']['points']:g} point(s) of the baseline: "
            f"`{best['schedule']}` (×{best['speedup']:.2f}, {best['accuracy']:.1f} points vs "
            f"{best['baseline']:.1f}"
            + (f", difference ± {best['se']:.1f} standard error)." if "se" in best else ")."),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["bench", "eval"])
    parser.add_argument("json_file")
    args = parser.parse_args()
    with open(args.json_file) as f:
        report = json.load(f)
    print(bench_table(report) if args.kind == "bench" else eval_table(report))


if __name__ == "__main__":
    main()
