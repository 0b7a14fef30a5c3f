"""`lazyllm-mlx bench`: TTFT, throughput and memory, baseline vs LazyLLM schedules."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import mlx.core as mx

from ..config import LazyConfig, split_schedules
from ..evals.bench import format_table, run_bench
from ..generate import for_model
from ..loading import load
from ..output_files import write_json
from .common import (
    add_model_argument,
    add_prefill_step_size_argument,
    int_list,
    model_label,
    output_file,
    output_folder,
    stderr_log,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--lengths", type=int_list, default=[1024, 2048, 4096], help="Prompt lengths in tokens"
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["paper,default"],
        help="Presets as a comma list and/or schedule strings as separate arguments, e.g. "
        "paper,default '0.5:0.6,0.75:0.6'",
    )
    parser.add_argument(
        "--skip-norevive",
        action="store_true",
        help="Do not also measure each schedule without revival (';norevive')",
    )
    parser.add_argument("--runs", type=int, default=3, help="Measured runs per cell (+1 warm-up)")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per run")
    add_prefill_step_size_argument(parser)
    parser.add_argument("--json", type=output_file, help="Write the results to this JSON file")
    parser.add_argument(
        "--plot-dir", type=output_folder, help="Write speedup.png and tokens_per_layer.png here"
    )
    parser.add_argument("--quiet", action="store_true", help="No per-run progress on stderr")


def run(args: argparse.Namespace) -> int:
    lengths = args.lengths
    schedules = split_schedules(args.schedules)
    if not args.skip_norevive:
        # "none" has nothing to revive
        revivable = [s for s in schedules if "norevive" not in s and LazyConfig.parse(s).boundaries]
        schedules += [f"{s};norevive" for s in revivable]
    model, tokenizer = load(args.model)
    log = stderr_log(args.quiet)
    name = model_label(args.model)
    context = dict(model=name, device=str(mx.default_device()), runs=args.runs,
                   max_tokens=args.max_tokens, prefill_step_size=args.prefill_step_size,
                   command=shlex.join(["lazyllm-mlx", "bench", *sys.argv[2:]]))  # fmt: skip
    rows = []
    for length in lengths:  # the JSON is rewritten after each length: long runs keep what they did
        rows += run_bench(
            model,
            tokenizer,
            [length],
            schedules,
            runs=args.runs,
            max_tokens=args.max_tokens,
            prefill_step_size=args.prefill_step_size,
            log=log,
        )
        if args.json:
            write_json(args.json, dict(context, rows=rows), indent=2)
    print(f"model: {name}; device: {mx.default_device()}; median of {args.runs} runs after a "
          f"warm-up; {args.max_tokens} generated tokens per run")  # fmt: skip
    print(format_table(rows))
    for text in schedules:
        config = for_model(text, model)
        if config is not None and config.source:
            print(f"schedule: {text} = {config.to_string()}   ({config.source})")
    if args.plot_dir:
        from ..evals.plots import plot_speedup, plot_tokens_per_layer

        out = Path(args.plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        short = Path(name).name  # a file or folder path: its name fits a title
        plot_speedup(rows, out / "speedup.png", f"TTFT speed-up, {short}")
        plot_tokens_per_layer(rows, out / "tokens_per_layer.png", f"Tokens per layer, {short}")
    return 0
