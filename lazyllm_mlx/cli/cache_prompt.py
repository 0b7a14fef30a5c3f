"""`lazyllm-mlx cache-prompt`: prefill a long document once and save the lazy cache to a file.

mlx-lm's convention: the document is the start of a user message (chat template applied with
`continue_final_message`, so the message stays open), and
`generate --prompt-cache-file F --prompt Q` continues that message with Q, then the template's end
of turn and generation prompt. Only Q and that tail are prefilled; pruned document tokens the
question needs are revived from the aux caches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..cache import LazyCache
from ..cache_io import load_lazy_cache, read_cache_header, save_lazy_cache
from ..config import LazyConfig
from ..engine import LazyStats
from ..generate import check_request, generate_step, make_lazy_cache
from ..loading import load
from .generate import progress_bar, read_prompt, resolve_schedule

QUERY_MARK = "<query>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF/MLX folder, hub id or .gguf file (default: SmolLM2)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", help="The document to cache ('-' reads stdin)")
    source.add_argument("--prompt-file", help="Read the document from this file")
    parser.add_argument(
        "--prompt-cache-file", required=True, help="Where to save the cache (.safetensors)"
    )
    parser.add_argument(
        "--schedule",
        default=None,
        help="LazyLLM schedule for the prefill and later turns (a preset or schedule string; "
        "'none' prunes nothing). Default: the model's stored schedule, else its family's "
        "calibrated preset ('safe' for Gemma 3), else 'default'.",
    )
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument(
        "--chat-template-config", default=None, help="JSON dict of apply_chat_template arguments"
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)


def _messages(system_prompt: str | None, content: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": content}]


def document_tokens(
    tokenizer: Any, text: str, system_prompt: str | None, template: dict[str, Any] | None
) -> tuple[str, list[int]]:
    """The cached prefix, as text and tokens: an open user message starting with `text`.

    template: apply_chat_template arguments, or None to use no chat template.
    """
    if template is None:
        bos = tokenizer.bos_token
        return text, tokenizer.encode(
            text, add_special_tokens=bos is None or not text.startswith(bos)
        )
    prefix = tokenizer.apply_chat_template(
        _messages(system_prompt, text),
        tokenize=False,
        add_generation_prompt=False,
        continue_final_message=True,
        **template,
    )
    return prefix, tokenizer.encode(prefix, add_special_tokens=False)


def query_tokens(
    tokenizer: Any, text: str, system_prompt: str | None, template: dict[str, Any] | None
) -> list[int]:
    """What follows the cached prefix: `text`, the end of the user turn, the generation prompt."""
    if template is not None:
        messages = _messages(system_prompt, text)
        full = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template
        )
        messages[-1]["content"] = QUERY_MARK
        marked = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template
        )
        text = full[marked.index(QUERY_MARK) :]  # mlx-lm's rule: everything from the content on
    return tokenizer.encode(text, add_special_tokens=False)


def run(args: argparse.Namespace) -> int:
    text = read_prompt(args)
    model, tokenizer = load(args.model)
    lazy = resolve_schedule(model, args.schedule)
    if lazy is None:
        raise ValueError(
            "cache-prompt saves a LazyLLM cache: give a schedule ('none' prunes nothing), "
            "not 'off'."
        )
    template = None
    if not args.ignore_chat_template and tokenizer.has_chat_template:
        template = json.loads(args.chat_template_config) if args.chat_template_config else {}
    prefix, tokens = document_tokens(tokenizer, text, args.system_prompt, template)
    prompt = mx.array(tokens, dtype=mx.int32)
    cache = make_lazy_cache(model, lazy)
    check_request(model, prompt, lazy, cache)
    stats = LazyStats(len(model.layers))
    start = time.perf_counter()
    steps = generate_step(
        prompt,
        model,
        lazy=lazy,
        max_tokens=0,  # prefill only
        prompt_cache=cache,
        stats=stats,
        prefill_step_size=args.prefill_step_size,
        prompt_progress_callback=progress_bar("cache-prompt"),
    )
    for _ in steps:
        pass
    mx.eval(cache.state)
    elapsed = time.perf_counter() - start
    metadata = {
        "model": _model_reference(args.model),
        "schedule": lazy.to_string(),
        "chat_template_args": json.dumps(template),  # "null": no chat template
        "system_prompt": json.dumps(args.system_prompt),
        "prefix": prefix,
        "prefix_tokens": str(len(tokens)),
    }
    save_lazy_cache(args.prompt_cache_file, cache, model, metadata)
    size = Path(args.prompt_cache_file).stat().st_size
    print(
        f"Prefilled {len(tokens)} tokens in {elapsed:.2f} s "
        f"(schedule {lazy.name or lazy.to_string()}, "
        f"{stats.prefill_fraction:.1%} of prompt token-layers computed); "
        f"saved {args.prompt_cache_file} ({size / 1e6:.1f} MB)"
    )
    return 0


def _model_reference(model: str | None) -> str:
    """How a later `generate` finds the model again: an absolute path, a hub id, or '' (default)."""
    if model is None:
        return ""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def continue_from_file(
    args: argparse.Namespace, text: str
) -> tuple[Any, Any, LazyConfig, list[int], LazyCache]:
    """For `generate --prompt-cache-file`: model, tokenizer, schedule, the query's tokens, cache.

    The model defaults to the one the file names; the schedule to the file's. Mismatched models or
    schedules and unreadable files raise ValueError / FileNotFoundError with a clear message.
    """
    path = args.prompt_cache_file
    if args.schedule == "off":
        raise ValueError("A prompt cache file holds LazyLLM state: --schedule 'off' cannot use it.")
    model_path = args.model
    if model_path is None:
        model_path = read_cache_header(path)[1].get("user", {}).get("model") or None
    model, tokenizer = load(model_path)
    lazy = None if args.schedule is None else resolve_schedule(model, args.schedule)
    cache, metadata = load_lazy_cache(path, model, lazy)
    if str(cache.offset) != metadata.get("prefix_tokens", str(cache.offset)):
        raise ValueError(f"{path}: corrupt prompt cache (its token count does not match)")
    template = json.loads(metadata.get("chat_template_args", "null"))
    system_prompt = json.loads(metadata.get("system_prompt", "null"))
    if args.system_prompt is not None and args.system_prompt != system_prompt:
        raise ValueError(
            f"{path} was built with system prompt {system_prompt!r}; it cannot change."
        )
    if args.ignore_chat_template:
        template = None
    tokens = query_tokens(tokenizer, text, system_prompt, template)
    lazy = lazy if lazy is not None else cache.config  # its options (norevive, min=) may differ
    return model, tokenizer, lazy, tokens, cache
