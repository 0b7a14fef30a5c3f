"""`lazyllm-mlx <command>`: one subcommand per module, dispatched here."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import distributed

# command -> (module, one-line help)
COMMANDS = {
    "generate": ("lazyllm_mlx.cli.generate", "generate text, LazyLLM vs baseline with --compare"),
    "bench": ("lazyllm_mlx.cli.bench", "TTFT, throughput and memory: baseline vs schedules"),
    "eval": ("lazyllm_mlx.cli.eval", "long-context quality: baseline vs schedules vs references"),
    "convert": ("lazyllm_mlx.cli.convert", "HF folder, hub id or GGUF -> MLX folder (+ schedule)"),
    "cache-prompt": ("lazyllm_mlx.cli.cache_prompt", "prefill a long document once, save it"),
    "serve": ("lazyllm_mlx.cli.serve", "OpenAI-compatible HTTP server (LazyLLM prefill)"),
    "probe": ("lazyllm_mlx.cli.probe", "which layers find a prompt's answer: where to cut"),
    "calibrate": ("lazyllm_mlx.cli.calibrate", "measure a model's schedules once, use them always"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lazyllm-mlx",
        description="LazyLLM token pruning for mlx-lm models: shorter time to first token.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top-level one
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if distributed.is_launched():  # under mlx.launch: refusals once, output from rank 0 only
        return distributed.run_command(module.run, args)
    try:
        return module.run(args) or 0
    except (ValueError, OSError) as error:
        print(f"lazyllm-mlx {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
