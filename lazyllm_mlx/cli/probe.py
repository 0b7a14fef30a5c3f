"""`lazyllm-mlx probe`: which layers' attention finds the answer of a needle prompt, and the
earliest single cut that keeps it (see lazyllm_mlx/evals/probe.py)."""

from __future__ import annotations

import argparse

from ..config import WINDOW_RULE_TEXT, LazyConfig
from ..evals.probe import PROBE_TASKS, probe, suggest
from ..loading import load
from ..output_files import write_json
from .common import (
    add_model_argument,
    command_line,
    fraction_list,
    int_list,
    model_label,
    output_file,
    stderr_log,
    unit_float,
)

DEFAULT_RULE = WINDOW_RULE_TEXT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--lengths", type=int_list, default=[2048], help="Prompt lengths")
    parser.add_argument("--num", type=int, default=8, help="Prompts per task and length")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the task builders")
    parser.add_argument(
        "--keeps", type=fraction_list, default=[0.2, 0.3, 0.4], help="Fractions kept at the cut"
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=[DEFAULT_RULE],
        help=f"Ranking rules as schedule options, compared on the same forward passes (default: "
        f"{DEFAULT_RULE}; 'w=1' is the paper's; the first one's cut is suggested)",
    )
    parser.add_argument(
        "--target",
        type=unit_float,
        default=0.95,
        help="Recall of the answer tokens the suggested cut must reach (default: 0.95)",
    )
    parser.add_argument("--json", type=output_file, metavar="PATH", help="Write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="No per-prompt progress on stderr")


def print_report(report: dict, target: float) -> None:
    keeps, tasks = report["keeps"], report["tasks"]
    print(
        f"\n{report['length']}-token prompts, {report['num']} per task ({', '.join(tasks)}): "
        "the answer tokens a cut after each full-attention layer keeps (recall)"
    )
    by = {(r["rule"], r["layer"], r["keep"]): r for r in report["rows"]}
    layers = sorted({r["layer"] for r in report["rows"]})
    for rule in report["rules"]:
        print(f"rule {rule or 'w=1 (the paper)'}")
        print(f"{'layer':>5}" + "".join(f"{f'keep {k:g}':>10}" for k in keeps) + "   by task "
              f"at keep {keeps[0]:g}")  # fmt: skip
        for layer in layers:
            line = f"{layer:>5}" + "".join(f"{by[rule, layer, k]['mean']:>10.2f}" for k in keeps)
            first = by[rule, layer, keeps[0]]["recall"]
            print(line + "   " + " ".join(f"{t} {first[t]:.2f}" for t in tasks if t in first))
    best = suggest(report, target)
    if best is None:
        print(f"No layer keeps {target:.0%} of the answer tokens at these keeps.")
    else:
        print(
            f"Cheapest single cut reaching {target:.0%}: boundary {best['boundary']} keeping "
            f"{best['keep']:g} (recall {best['recall']:.2f}, prefill fraction "
            f"{best['prefill_fraction']:.3f}): --schedule '{best['schedule']}'"
        )


def run(args: argparse.Namespace) -> int:
    if args.num <= 0:
        raise ValueError("--num must be positive.")
    rules = [LazyConfig.parse(f"none;{rule}" if rule.strip() else "none") for rule in args.rules]
    model, tokenizer = load(args.model)
    log = stderr_log(args.quiet)
    reports = []
    for length in args.lengths:
        report = probe(
            model, tokenizer, rules, length=length, num=args.num, keeps=args.keeps, seed=args.seed,
            log=log,
        )  # fmt: skip
        report["model"] = model_label(args.model)
        report["suggestion"] = suggest(report, args.target)
        reports.append(report)
        print_report(report, args.target)
    if args.json:
        command = command_line(args, "probe")
        write_json(args.json, dict(model=model_label(args.model), command=command,
                                   tasks=list(PROBE_TASKS), reports=reports))  # fmt: skip
    return 0
