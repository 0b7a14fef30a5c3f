"""`lazyllm-mlx serve`: an OpenAI-compatible HTTP server for one model, with LazyLLM prefill."""

from __future__ import annotations

import argparse
import sys

from ..default_model import DEFAULT_MODEL_NAME
from ..families import family_of
from ..generate import resolve_schedule
from ..loading import load
from ..server import GenerationService, make_server
from .common import (
    add_model_argument,
    add_prefill_step_size_argument,
    add_schedule_argument,
    json_object,
    non_negative_float,
    unit_float,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on")
    add_schedule_argument(
        parser,
        "Default LazyLLM schedule (a preset, a schedule string, or 'off' for plain mlx-lm); "
        'a request may choose its own with the extra field "lazy".',
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="Default max_tokens")
    parser.add_argument("--temp", type=non_negative_float, default=0.0, help="Default temperature")
    parser.add_argument("--top-p", type=unit_float, default=1.0, help="Default top_p")
    add_prefill_step_size_argument(parser)
    parser.add_argument(
        "--chat-template-args",
        type=json_object,
        default=None,
        help="JSON dict of apply_chat_template arguments",
    )
    parser.add_argument(
        "--cache-slots",
        type=int,
        default=4,
        help="Prompt caches kept between requests, one per schedule in use (least recent dropped)",
    )
    parser.add_argument("--quiet", action="store_true", help="Do not log each request")


def run(args: argparse.Namespace) -> int:
    template_args = args.chat_template_args or {}
    model, tokenizer = load(args.model)
    lazy = resolve_schedule(model, args.schedule)
    if lazy is not None:
        lazy.resolve(family_of(model).num_layers)  # refuse a schedule that cannot serve at all
    service = GenerationService(
        model,
        tokenizer,
        lazy=lazy,
        model_id=args.model or DEFAULT_MODEL_NAME,
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        prefill_step_size=args.prefill_step_size,
        chat_template_args=template_args,
        cache_slots=args.cache_slots,
    )
    server = make_server(service, args.host, args.port, quiet=args.quiet)
    schedule = "off (plain mlx-lm)" if lazy is None else lazy.name or lazy.to_string()
    print(
        f"lazyllm-mlx serve: {service.model_id} on {server.url} (schedule: {schedule}); "
        "one generation at a time, Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
