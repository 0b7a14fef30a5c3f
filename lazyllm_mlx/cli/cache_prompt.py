"""`lazyllm-mlx cache-prompt`: prefill a long document once and save the lazy cache to a file.

`generate --prompt-cache-file F --prompt Q` then continues the document with Q (see
lazyllm_mlx.prompt_cache for the convention). mlx_lm.cache_prompt's --adapter-path,
--trust-remote-code and --eos-token work (the file keeps the adapter and the token for that later
turn); its KV cache flags are refused with the reason, as `generate` refuses them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

from ..document_cache import document_tokens, save_document_cache
from ..generate import check_request, generate_step, make_lazy_cache, resolve_schedule
from ..stats import LazyStats
from .common import (
    KV_CACHE_REASON,
    add_chat_template_arguments,
    add_kv_cache_arguments,
    add_loading_arguments,
    add_model_argument,
    add_prefill_step_size_argument,
    add_schedule_argument,
    chat_template_config,
    kv_cache_flags,
    kv_cache_options,
    output_file,
    progress_bar,
    read_prompt,
)
from .generate import add_eos_tokens, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", help="The document to cache ('-' reads stdin)")
    source.add_argument("--prompt-file", help="Read the document from this file")
    parser.add_argument(
        "--prompt-cache-file",
        type=output_file,
        required=True,
        help="Where to save the cache (.safetensors)",
    )
    add_schedule_argument(
        parser,
        "LazyLLM schedule for the prefill and later turns (a preset or schedule string; "
        "'none' prunes nothing).",
    )
    add_chat_template_arguments(parser)
    add_prefill_step_size_argument(parser)
    add_loading_arguments(parser)
    parser.add_argument(
        "--eos-token",
        default=None,
        help="A token (text or id) that ends the generations continued from this cache",
    )
    add_kv_cache_arguments(parser, " (not supported: the cache is a lazy one)")


def run(args: argparse.Namespace) -> int:
    text = read_prompt(args)
    if options := kv_cache_options(args):
        raise ValueError(
            f"{kv_cache_flags(options)} cannot be used with cache-prompt, which saves a LazyLLM "
            f"cache: {KV_CACHE_REASON}; for an mlx-lm cache, run mlx_lm.cache_prompt."
        )
    model, tokenizer = load_model(args, args.model)
    eos_tokens = [args.eos_token] if args.eos_token is not None else []
    add_eos_tokens(tokenizer, eos_tokens, "--eos-token")  # a token it does not know fails now
    lazy = resolve_schedule(model, args.schedule)
    if lazy is None:
        raise ValueError(
            "cache-prompt saves a LazyLLM cache: give a schedule ('none' prunes nothing), "
            "not 'off'."
        )
    template = None
    if not args.ignore_chat_template and tokenizer.has_chat_template:
        template = chat_template_config(args)
    try:
        prefix, tokens = document_tokens(tokenizer, text, args.system_prompt, template)
    except ValueError:
        raise  # already one line: said by document_tokens
    except Exception as error:  # jinja2's TemplateError, a raise_exception() in the template
        raise ValueError(f"the chat template failed: {error}") from None
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
    save_document_cache(
        args.prompt_cache_file,
        cache,
        model,
        model_source=args.model,
        prefix=prefix,
        template=template,
        system_prompt=args.system_prompt,
        adapter_path=args.adapter_path,
        eos_tokens=eos_tokens,
    )
    size = Path(args.prompt_cache_file).stat().st_size
    print(
        f"Prefilled {len(tokens)} tokens in {elapsed:.2f} s "
        f"(schedule {lazy.name or lazy.to_string()}, "
        f"{stats.prefill_fraction:.1%} of prompt token-layers computed); "
        f"saved {args.prompt_cache_file} ({size / 1e6:.1f} MB)"
    )
    return 0
