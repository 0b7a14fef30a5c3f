"""`lazyllm-mlx serve`: an OpenAI-compatible HTTP server for one model, with LazyLLM prefill."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from ..default_model import DEFAULT_MODEL_NAME
from ..families import family_of
from ..generate import resolve_schedule
from ..server import GenerationService, make_server
from .common import (
    KV_CACHE_REASON,
    SPECULATIVE_REASON,
    DefaultsHelpFormatter,
    add_default_chat_template_argument,
    add_loading_arguments,
    add_model_argument,
    add_prefill_step_size_argument,
    add_refused_argument,
    add_schedule_argument,
    byte_size,
    check_default_chat_template,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_int,
    template_arguments,
    unit_float,
)
from .generate import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter  # --help shows the defaults, as mlx-lm's does
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=port_number, default=8080, help="Port to listen on")
    parser.add_argument(
        "--allowed-origins",
        type=lambda text: [o.strip() for o in text.split(",") if o.strip()],
        default=["*"],
        help="Origins a browser page may call the server from, comma-separated ('*': any)",
    )
    add_schedule_argument(
        parser,
        "Default LazyLLM schedule (a preset, a schedule string, or 'off' for plain mlx-lm); "
        'a request may choose its own with the extra field "lazy".',
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=512,
        help="max_tokens of a request that gives none",
    )
    parser.add_argument(
        "--temp",
        type=non_negative_float,
        default=0.0,
        help="temperature of a request that gives none",
    )
    parser.add_argument(
        "--top-p", type=unit_float, default=1.0, help="top_p of a request that gives none"
    )
    parser.add_argument(
        "--top-k",
        type=non_negative_int,
        default=0,
        help="top_k of a request that gives none (0: off)",
    )
    parser.add_argument(
        "--min-p", type=unit_float, default=0.0, help="min_p of a request that gives none (0: off)"
    )
    add_prefill_step_size_argument(parser)
    parser.add_argument(
        "--chat-template-args",
        type=template_arguments,
        default=None,
        help="JSON dict of apply_chat_template arguments",
    )
    parser.add_argument(
        "--prompt-cache-size",
        "--cache-slots",
        dest="cache_slots",
        type=non_negative_int,
        default=4,
        help="Prompt caches kept between requests, several per schedule (least recent dropped)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=byte_size,
        default=None,
        help="Most bytes the kept prompt caches may hold, e.g. 2GB or 500MB (least recent "
        "dropped; default: no limit beyond --prompt-cache-size)",
    )
    parser.add_argument("--quiet", action="store_true", help="Do not log each request")
    add_loading_arguments(parser)
    parser.add_argument("--chat-template", help="A chat template (Jinja) in place of the model's")
    add_default_chat_template_argument(parser)
    add_mlx_lm_refusals(parser)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="Level of the server's log on stderr",
    )


def add_mlx_lm_refusals(parser: argparse.ArgumentParser) -> None:
    """mlx_lm.server's flags that this server refuses, each with its reason."""
    draft = f"{SPECULATIVE_REASON}; run mlx_lm.server --draft-model"
    add_refused_argument(parser, "--draft-model", reason=draft)
    add_refused_argument(parser, "--num-draft-tokens", reason=draft)
    kv = f"{KV_CACHE_REASON}; run mlx_lm.server --kv-bits"
    for flag in ("--kv-bits", "--kv-group-size", "--quantized-kv-start"):
        add_refused_argument(parser, flag, reason=kv)
    batch = "the lazy engine runs one sequence at a time, so requests are served in turn"
    add_refused_argument(parser, "--decode-concurrency", reason=batch)
    add_refused_argument(parser, "--prompt-concurrency", reason=batch)
    add_refused_argument(
        parser, "--pipeline", nargs=0, reason="the server runs on one machine, not distributed"
    )


def run(args: argparse.Namespace) -> int:
    check_default_chat_template(args, "give one with --chat-template")
    logging.basicConfig(level=getattr(logging, args.log_level))
    try:  # the port first: a busy one is found before a model is loaded
        server = make_server(None, args.host, args.port, args.quiet, args.allowed_origins)
    except OSError as error:
        hint = " (is another server running there? choose another --port)"
        busy = error.errno == errno.EADDRINUSE
        raise ValueError(
            f"cannot listen on {args.host}:{args.port}: {error.strerror or error}"
            + (hint if busy else "")
        ) from None
    try:
        return _serve(server, args)
    finally:
        server.server_close()


def _serve(server, args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args, args.model)
    if args.chat_template is not None:  # as mlx_lm.server's --chat-template
        tokenizer._tokenizer.chat_template = args.chat_template
        tokenizer.has_chat_template = True
    lazy = resolve_schedule(model, args.schedule)
    if lazy is not None:
        lazy.resolve(family_of(model).num_layers)  # refuse a schedule that cannot serve at all
    server.service = GenerationService(
        model,
        tokenizer,
        lazy=lazy,
        model_id=args.model or DEFAULT_MODEL_NAME,
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        prefill_step_size=args.prefill_step_size,
        chat_template_args=args.chat_template_args or {},
        cache_slots=args.cache_slots,
        cache_bytes=args.prompt_cache_bytes,
    )
    schedule = "off (plain mlx-lm)" if lazy is None else lazy.name or lazy.to_string()
    if lazy is not None and lazy.source:
        schedule += f" = {lazy.to_string()}; {lazy.source}"
    print(
        f"lazyllm-mlx serve: {server.service.model_id} on {server.url} (schedule: {schedule}); "
        "one generation at a time, Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
