"""What the commands share: the flags declared once, the model's name, reading the prompt, and
progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..default_model import DEFAULT_MODEL_NAME

MODEL_HELP = f"HF/MLX folder, hub id or .gguf file (default: {DEFAULT_MODEL_NAME})"
SCHEDULE_DEFAULT = (
    "Default: the model's stored schedule, else its family's calibrated preset ('safe' for "
    "Gemma 3), else 'default'."
)


def add_model_argument(
    parser: argparse.ArgumentParser, *flags: str, help: str = MODEL_HELP
) -> None:
    parser.add_argument(*(flags or ("--model",)), default=None, help=help)


def add_schedule_argument(parser: argparse.ArgumentParser, about: str) -> None:
    """--schedule: `about` says what it takes here; without it, the model's default schedule."""
    parser.add_argument("--schedule", default=None, help=f"{about} {SCHEDULE_DEFAULT}")


def add_prefill_step_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-step-size", type=int, default=2048)


def add_chat_template_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument(
        "--chat-template-config", default=None, help="JSON dict of apply_chat_template arguments"
    )


def chat_template_config(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(args.chat_template_config) if args.chat_template_config else {}


def model_label(model: str | None) -> str:
    """The model as reports name it: the path or hub id given, or the default model."""
    return model or f"default ({DEFAULT_MODEL_NAME})"


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt-file's text, else --prompt's ('-' reads stdin; \\n and \\t are unescaped)."""
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
        text = sys.stdin.read() if text == "-" else text
    if not text.strip():
        raise ValueError("The prompt is empty.")
    return text


def progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A live prefill progress line on stderr when it is a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: prefill {done}/{total} tokens ({done / max(total, 1):.0%})",
              end=end, file=sys.stderr, flush=True)  # fmt: skip

    return show


def stderr_log(quiet: bool) -> Callable[[str], None]:
    """Per-run progress messages on stderr, or nothing with --quiet."""
    if quiet:
        return lambda _: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (prompt lengths)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def fraction_list(text: str) -> list[float]:
    """argparse type: comma-separated fractions in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions, got {text!r}"
        ) from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {text!r}")
    return values
