"""`lazyllm-mlx eval`: the offline long-context quality suite, baseline vs lazy vs references.

Prints a table per prompt length (accuracy per task, agreement with the baseline, TTFT speed-up,
prefill fraction), writes the report as JSON and the accuracy / speed-up plot as PNG. `--search P`
tries a grid of schedules and prints the fastest within P points of the baseline's accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from typing import Any

from ..config import split_schedules
from ..evals.baselines import BaselineStore
from ..evals.run import best_schedule, evaluate
from ..evals.tasks import TASKS
from ..loading import load
from ..output_files import write_json
from .common import (
    add_model_argument,
    command_line,
    int_list,
    model_label,
    non_negative_float,
    output_file,
    stderr_log,
)

# Calibration grid: the paper's stage layout at several keeps, an earlier / later first cut, and
# the `default` layout (a first half unpruned) at a milder and its own keep.
SEARCH_GRID = [
    "0.5:0.8,0.75:0.7",
    "0.5:0.6,0.75:0.6",
    "0.3:0.9,0.6:0.9,0.9:0.9",
    "0.3:0.8,0.6:0.8,0.9:0.8",
    "0.3:0.7,0.6:0.7,0.9:0.7",
    "0.3:0.6,0.6:0.6,0.9:0.6",
    "0.3:0.5,0.6:0.5,0.9:0.5",
    "0.2:0.8,0.5:0.7,0.8:0.6",
    "0.4:0.7,0.7:0.5",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=None,
        help="LazyLLM schedules to compare: presets as a comma list and/or schedule strings as "
        "separate arguments, e.g. paper,default '0.5:0.8,0.75:0.7' 'paper;norevive' "
        "(default: default; with --search: a built-in grid)",
    )
    parser.add_argument("--lengths", type=int_list, default=[1024], help="Prompt lengths")
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"Comma list of {', '.join(TASKS)}"
    )
    parser.add_argument("--num", type=int, default=5, help="Prompts per task and length")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="Tokens to generate per prompt (default per task: enough for the answer)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the task builders")
    parser.add_argument(
        "--first-prompt",
        type=int,
        default=0,
        help="Index of each task's first prompt: with the same seed, --first-prompt N --num M "
        "adds prompts N..N+M-1 to a run of --num N (tools/pool_evals.py merges the reports)",
    )
    parser.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="Render prompts with the chat template (auto: when the tokenizer has one)",
    )
    parser.add_argument(
        "--no-references", action="store_true", help="Skip random-drop and static references"
    )
    parser.add_argument(
        "--no-none", action="store_true", help="Skip the engine-without-pruning column"
    )
    parser.add_argument(
        "--search",
        type=non_negative_float,
        metavar="POINTS",
        default=None,
        help="Calibrate: run the schedules (default: a grid) without references and print the "
        "fastest whose mean accuracy is within POINTS of the baseline's",
    )
    parser.add_argument(
        "--baseline-cache",
        metavar="DIR",
        help="Reuse the baseline's outcomes stored in DIR and store new ones there: a new "
        "schedule then costs only its own runs (TTFT × is then against the stored runs)",
    )
    parser.add_argument("--json", type=output_file, metavar="PATH", help="Write the report as JSON")
    parser.add_argument(
        "--plot", type=output_file, metavar="PATH", help="Draw accuracy vs TTFT speed-up (PNG)"
    )
    parser.add_argument("--quiet", action="store_true", help="No per-run progress on stderr")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _delta(row: dict[str, Any], estimated: bool) -> str:
    """The accuracy difference and its standard error; one prompt per task gives no estimate."""
    error = f"±{row['accuracy_delta_se']:.1f}" if estimated else "(no se)"
    return f"{row['accuracy_delta']:+.1f} {error}"


def print_table(report: dict[str, Any]) -> None:
    tasks = report["tasks"]
    estimated = report["num"] > 1
    print(f"model: {report['model']}, {report['num']} prompts per task, seed {report['seed']}")
    if not estimated:
        print(
            "one prompt per task: the differences from the baseline have no error estimate "
            "(run --num 2 or more for one)"
        )
    print(
        "accuracy in points (passkey/kv: number match, mdqa: module named, code: edit similarity);"
        " KL(baseline ‖ method) of the first token in nats; cont.: greedy continuation matching"
        " the baseline's; 1st ok: first token agreement on the prompts the baseline answers right;"
        " TTFT ×: median over prompts of baseline TTFT / method TTFT;"
        " Δ: mean minus the baseline's ± its standard error over the same prompts"
    )
    head = f"{'method':<28}{'prefill':>8}" + "".join(f"{t:>8}" for t in tasks)
    delta = "Δ ±se" if estimated else "Δ"
    head += f"{'mean':>7}{delta:>13}{'1st tok':>8}{'1st ok':>7}{'KL':>8}{'cont.':>7}{'TTFT ×':>8}"
    head += f"{'× none':>8}"
    for length in report["lengths"]:
        print(f"\n{length}-token prompts")
        rows = [r for r in report["results"] if r["length"] == length]
        if rows and rows[0].get("baselines_reused"):
            print(
                f"(baseline outcomes of {rows[0]['baselines_reused']} prompts reused from "
                "--baseline-cache: TTFT × is against those earlier runs)"
            )
        print(head)
        for r in (r for r in report["results"] if r["length"] == length):
            line = f"{r['method'][:27]:<28}{r['prefill_fraction']:>8.3f}"
            line += "".join(f"{r['scores'][t]:>8.1f}" for t in tasks)
            delta = _delta(r, estimated)
            line += f"{r['accuracy']:>7.1f}{delta:>13}{r['first_token']:>8.0%}"
            line += f"{_cell(r.get('first_token_where_right'), '{:.0%}'):>7}{r['kl']:>8.3f}"
            line += f"{r['continuation']:>7.0%}{r['ttft_speedup']:>8.2f}"
            line += f"{_cell(r['ttft_speedup_vs_none'], '{:.2f}'):>8}"
            print(line)
        for r in report["results"]:
            if r["length"] == length and r["family"] == "static":
                print(f"  {r['method']} = {r['schedule']}")


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; tasks: {', '.join(TASKS)}.")
    if args.num <= 0:
        raise ValueError("--num must be positive.")
    if args.first_prompt < 0:
        raise ValueError("--first-prompt must be 0 or more.")
    searching = args.search is not None
    if args.schedules is None:
        schedules = SEARCH_GRID if searching else ["default"]
    else:
        schedules = split_schedules(args.schedules)
    if args.plot:
        from ..evals.plots import pyplot

        pyplot()  # fails before the long run, not after it
    model, tokenizer = load(args.model)
    chat = None if args.chat == "auto" else args.chat == "on"
    header = dict(
        model=model_label(args.model),
        command=command_line(args),
        python=platform.python_version(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )

    def keep_partial(report: dict[str, Any]) -> None:  # a long run's JSON holds what it has done
        if args.json:
            write_json(args.json, dict(header, partial=True, **report))

    report = evaluate(
        model,
        tokenizer,
        schedules=schedules,
        lengths=args.lengths,
        tasks=tasks,
        num=args.num,
        seed=args.seed,
        first_prompt=args.first_prompt,
        max_tokens=args.max_tokens,
        chat=chat,
        references=not (args.no_references or searching),
        include_none=not (args.no_none or searching),
        log=stderr_log(args.quiet),
        baselines=BaselineStore(args.baseline_cache, model) if args.baseline_cache else None,
        on_prompt=keep_partial,
    )
    report = dict(header, **report)
    print_table(report)
    if searching:
        best = best_schedule(report, args.search)
        report["search"] = dict(points=args.search, best=best)
        if best is None:
            print(f"\nNo schedule kept the accuracy within {args.search} points of the baseline.")
        else:
            error = f"±{best['se']:.1f} standard error" if args.num > 1 else "no error estimate"
            print(
                f"\nFastest within {args.search} points of the baseline "
                f"({best['baseline']:.1f}): ×{best['speedup']:.2f} at {best['accuracy']:.1f} "
                f"points (difference {error})\n"
                f"--schedule '{best['schedule']}'"
            )
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from ..evals.plots import plot_report

        plot_report(report, args.plot)
    return 0
