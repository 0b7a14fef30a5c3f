"""What the commands share: the flags declared once, the model's name, reading the prompt, and
progress on stderr."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..default_model import DEFAULT_MODEL_NAME
from ..output_files import check_writable

MODEL_HELP = f"HF/MLX folder, hub id or .gguf file (default: {DEFAULT_MODEL_NAME})"
SCHEDULE_DEFAULT = (
    "Default: the model's stored schedule, else 'default': its calibration (lazyllm-mlx "
    "calibrate, or shipped), else the generic layout."
)


def add_model_argument(
    parser: argparse.ArgumentParser, *flags: str, help: str = MODEL_HELP
) -> None:
    parser.add_argument(*(flags or ("--model",)), default=None, help=help)


def add_schedule_argument(parser: argparse.ArgumentParser, about: str) -> None:
    """--schedule: `about` says what it takes here; without it, the model's default schedule."""
    parser.add_argument(
        "--schedule", type=schedule_text, default=None, help=f"{about} {SCHEDULE_DEFAULT}"
    )


def add_prefill_step_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=2048,
        help="Prompt tokens computed per step (bounds the prefill's memory)",
    )


def add_chat_template_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument(
        "--chat-template-config",
        type=json_object,
        default=None,
        help="JSON dict of apply_chat_template arguments",
    )


def chat_template_config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.chat_template_config or {})


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's sampling flags, checked: a negative temperature would sample garbage."""
    parser.add_argument("--temp", type=non_negative_float, default=0.0, help="Sampling temperature")
    parser.add_argument("--top-p", type=unit_float, default=1.0, help="Sampling top-p")
    parser.add_argument("--min-p", type=unit_float, default=0.0, help="Sampling min-p")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="Sampling top-k")


def model_label(model: str | None) -> str:
    """The model as reports name it: the path or hub id given, or the default model."""
    return model or f"default ({DEFAULT_MODEL_NAME})"


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt-file's text, else --prompt's ('-' reads stdin; \\n and \\t are unescaped)."""
    if args.prompt_file:
        text = read_text_file(args.prompt_file, "--prompt-file")
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


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file's contents; ValueError naming `flag` for what is not one."""
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a text file.")
    if not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({error.reason}).") from None
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be read: {error.strerror}.") from None


def _number(text: str, kind: type, what: str, ok: Callable[[Any], bool]) -> Any:
    """`text` as a `kind` for which ok(value) holds; else the argparse error "expected {what}"."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return _number(text, float, "a number >= 0", lambda v: 0 <= v < float("inf"))


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, "a number between 0 and 1", lambda v: 0 <= v <= 1)


def schedule_text(text: str) -> str:
    """argparse type: a schedule string; an empty one is a mistake, not 'none'."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "the schedule is empty: give a preset (none, paper, default, fast, safe), 'off' or "
            "'boundary:keep,...'"
        )
    return text


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (apply_chat_template's keyword arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def _writable_folder(folder: Path, path: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {existing} is not writable")


def output_file(text: str) -> str:
    """argparse type: a regular file (or a new name) that can be written, checked before any work
    is done; devices, FIFOs and directories are refused (see output_files)."""
    try:
        target = check_writable(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if target.exists() and not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is read-only")
    return text


def output_folder(text: str) -> str:
    """argparse type: a folder that exists or can be created."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    _writable_folder(path, text)
    return text


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    return _number(text, int, "a port number 0-65535", lambda v: 0 <= v <= 65535)


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMG]?)B?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, as mlx-lm's server takes it: 500000000, 500MB, 2G."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 2GB, 500MB or 1000000, got {text!r}"
        )
    return int(float(match[1]) * _UNITS[match[2].upper()])


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each flag with its default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        said = "(default" in text.lower() or "default:" in text.lower()
        if shown and action.option_strings and not said:
            default = action.default
            if isinstance(default, list):
                default = ",".join(map(str, default))
            text += f" (default: {default})"
        return text


def command_line(args: argparse.Namespace, command: str = "eval") -> str:
    """The command as a shell line, rebuilt from the parsed arguments (for the report)."""
    words = ["lazyllm-mlx", command]
    for key, value in vars(args).items():
        if key == "command" or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            words.append(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value))
        elif isinstance(value, list):
            words += value
        elif value is not True:
            words.append(str(value))
    return shlex.join(words)
