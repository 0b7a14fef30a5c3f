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

from ..config import LazyConfig
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


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's --adapter-path and --trust-remote-code (cli.generate.load_model applies them)."""
    parser.add_argument("--adapter-path", help="Trained adapter weights and config (LoRA)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Let the tokenizer run code from the model's repository (never implied)",
    )


def add_default_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--use-default-chat-template",
        action="store_true",
        help="Not supported: transformers ships no default chat templates any more",
    )


def check_default_chat_template(args: argparse.Namespace, instead: str) -> None:
    """Refuse mlx-lm's --use-default-chat-template: the tokenizer attribute it reads is gone."""
    if args.use_default_chat_template:
        raise ValueError(
            "--use-default-chat-template is not supported: transformers no longer ships default "
            f"chat templates; {instead}."
        )


def add_refused_argument(
    parser: argparse.ArgumentParser, *flags: str, reason: str, **kwargs: Any
) -> None:
    """An mlx-lm flag this command does not support: giving it fails at once with `reason`."""

    class Refused(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            raise argparse.ArgumentError(self, f"not supported: {reason}")

    parser.add_argument(*flags, action=Refused, help=f"Not supported: {reason}", **kwargs)


SPECULATIVE_REASON = (
    "speculative decoding verifies several drafted tokens in one forward pass, while the lazy "
    "engine decodes one token at a time with revival"
)

# Why mlx-lm's KV cache flags cannot apply to a lazy cache (generate, cache-prompt).
KV_CACHE_REASON = (
    "the lazy engine keeps the KV of every token it computed in the model's dtype (a pruned "
    "token may be revived at any later step), so it can neither drop the oldest tokens nor "
    "quantize them"
)


def add_kv_cache_arguments(parser: argparse.ArgumentParser, note: str) -> None:
    """mlx-lm's KV cache flags; `note` says where they apply."""
    from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START

    parser.add_argument(
        "--max-kv-size", type=positive_int, default=None, help="KV cache size cap" + note
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=(2, 3, 4, 5, 6, 8),
        default=None,
        help="Quantize the KV cache" + note,
    )
    parser.add_argument("--kv-group-size", type=positive_int, default=64, help="With --kv-bits")
    parser.add_argument(
        "--quantized-kv-start",
        type=non_negative_int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="With --kv-bits: quantize from this step on",
    )


def kv_cache_options(args: argparse.Namespace) -> dict[str, int]:
    """The KV cache options given, as mlx-lm's generate_step takes them ({} for none);
    --kv-group-size and --quantized-kv-start only count with --kv-bits, as in mlx-lm."""
    options = {}
    if args.max_kv_size is not None:
        options["max_kv_size"] = args.max_kv_size
    if args.kv_bits is not None:
        options.update(
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
        )
    return options


def kv_cache_flags(options: dict[str, int]) -> str:
    """The flags behind `options`, for a message: '--max-kv-size and --kv-bits'."""
    given = [k for k in ("max_kv_size", "kv_bits") if k in options]
    return " and ".join("--" + k.replace("_", "-") for k in given)


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
        type=template_arguments,
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


MAX_PROMPT_BYTES = 64 * 2**20  # a prompt file or stdin past this is a mistake, not a prompt


def read_prompt(args: argparse.Namespace, default: str | None = None) -> str:
    """--prompt-file's text, else --prompt's ('-' reads stdin; \\n and \\t are unescaped),
    else `default`; ValueError for both at once, text that is not UTF-8, or an empty prompt."""
    if args.prompt_file is not None and args.prompt is not None:
        raise ValueError("give --prompt or --prompt-file, not both.")
    if args.prompt_file is not None:
        text = read_text_file(args.prompt_file, "--prompt-file")
    elif args.prompt == "-":
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        text = _utf8(data, "--prompt - (standard input)")
    else:
        text = default if args.prompt is None else args.prompt
        try:  # a byte that is not UTF-8 reaches argv as a lone surrogate
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--prompt is not UTF-8 text.") from None
        text = text.replace("\\n", "\n").replace("\\t", "\t")
    if text is None or not text.strip():
        raise ValueError("The prompt is empty.")
    return text


def _utf8(data: bytes, what: str) -> str:
    if len(data) > MAX_PROMPT_BYTES:
        raise ValueError(f"{what} is over {MAX_PROMPT_BYTES >> 20} MB: not a prompt.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text ({error.reason}).") from None


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
    if not Path(path).is_file():  # a FIFO would wait for a writer, /dev/zero never ends
        raise ValueError(f"{flag} {path} is not a regular file; give a text file.")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as error:
        raise ValueError(f"{flag} {path} cannot be read: {error.strerror}.") from None
    return _utf8(data, f"{flag} {path}")


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
    if text.strip() != "off":
        try:  # before a model is loaded for nothing
            LazyConfig.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def seed_int(text: str) -> int:
    """argparse type: a PRNG seed, 0 to 2**64 - 1 (what mx.random.seed takes)."""
    return _number(text, int, "an integer from 0 to 2**64 - 1", lambda v: 0 <= v < 2**64)


def strict_bool(text: str) -> bool:
    """argparse type: mlx-lm's True/T/False/F (any case), or yes/no, 1/0."""
    value = text.strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# apply_chat_template's arguments the commands set themselves
_TEMPLATE_OWN = ("conversation", "messages", "tokenize", "add_generation_prompt", "return_dict")


def template_arguments(text: str) -> dict[str, Any]:
    """argparse type: a JSON object of apply_chat_template keyword arguments, none of those the
    command sets itself."""
    value = json_object(text)
    own = [key for key in value if key in _TEMPLATE_OWN]
    if own:
        raise argparse.ArgumentTypeError(f"{own[0]!r} is set by the command, not here")
    return value


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
