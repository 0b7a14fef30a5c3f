"""`lazyllm-mlx generate`: mlx-lm's generate flags, plus --schedule, --compare, --json.

mlx-lm's flags that need its own KV cache (--max-kv-size, --kv-bits) work with --schedule off
(plain mlx-lm) and are refused with the reason otherwise; --draft-model, --num-draft-tokens and
--use-default-chat-template are refused (see `check_mlx_lm_options`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import common_prefix_len

from .. import distributed
from .._platform import warn_if_quantized_on_cpu
from ..cache import per_layer
from ..config import LazyConfig
from ..document_cache import cached_loading, check_plain, continue_from_file
from ..evals.measure import generate_once, warm_up
from ..evals.scores import prefix_fraction
from ..generate import resolve_schedule
from ..loading import load
from .common import (
    KV_CACHE_REASON,
    SPECULATIVE_REASON,
    add_chat_template_arguments,
    add_default_chat_template_argument,
    add_kv_cache_arguments,
    add_loading_arguments,
    add_model_argument,
    add_prefill_step_size_argument,
    add_refused_argument,
    add_sampling_arguments,
    add_schedule_argument,
    chat_template_config,
    check_default_chat_template,
    kv_cache_flags,
    kv_cache_options,
    model_label,
    non_negative_int,
    positive_int,
    progress_bar,
    read_prompt,
    seed_int,
    strict_bool,
    unit_float,
)

DEFAULT_PROMPT = "hello"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--prompt", "-p", default=None,
        help=f"Message for the model ('-' reads stdin; default: {DEFAULT_PROMPT!r})",
    )  # fmt: skip
    parser.add_argument("--prompt-file", help="Read the message from this file (long prompts)")
    parser.add_argument("--max-tokens", "-m", type=non_negative_int, default=100)
    add_sampling_arguments(parser)
    parser.add_argument("--xtc-probability", type=unit_float, default=0.0,
                        help="Probability of XTC sampling at each token (mlx-lm's)")  # fmt: skip
    parser.add_argument("--xtc-threshold", type=unit_float, default=0.0,
                        help="XTC's probability threshold for a candidate token")  # fmt: skip
    parser.add_argument("--prefill-response", default=None,
                        help="Start the assistant's answer with this text")  # fmt: skip
    parser.add_argument("--min-tokens-to-keep", type=positive_int, default=1)
    parser.add_argument("--seed", type=seed_int, default=None, help="PRNG seed")
    add_chat_template_arguments(parser)
    add_prefill_step_size_argument(parser)
    parser.add_argument(
        "--verbose", type=strict_bool, default=True, help="'False' prints only the generated text"
    )
    add_schedule_argument(
        parser,
        "LazyLLM schedule: a preset (none, paper, default, fast, safe), 'off' for plain mlx-lm, or "
        "'boundary:keep,...[;min=N][;norevive]' e.g. 0.3:0.7,0.6:0.7 (depth fractions) or "
        "9:0.7,18:0.5 (layers).",
    )
    parser.add_argument(
        "--compare", action="store_true", help="Run baseline and lazy on the same prompt"
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch: split the layers over the processes instead of the heads "
        "(chosen anyway where the heads do not split)",
    )
    parser.add_argument(
        "--prompt-cache-file",
        help="Continue a cache saved by `lazyllm-mlx cache-prompt`: the prompt goes on from the "
        "cached document (model, adapter and schedule default to the file's; its --eos-token "
        "ends the generation)",
    )
    add_mlx_lm_arguments(parser)


def add_mlx_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The rest of mlx_lm.generate's flags: each works, or is refused with the reason."""
    add_loading_arguments(parser)
    parser.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=(),
        help="More tokens (text or ids) that end the generation",
    )
    add_kv_cache_arguments(parser, " (plain mlx-lm only: --schedule off)")
    add_default_chat_template_argument(parser)
    parser.add_argument("--draft-model", default=None, help="Not supported (speculative decoding)")
    parser.add_argument(
        "--num-draft-tokens", type=positive_int, default=None, help="Not supported (as above)"
    )
    add_refused_argument(
        parser,
        "--image",
        nargs="+",
        reason="the lazy engine prunes the tokens of text models only; run mlx_lm.generate --image",
    )
    add_refused_argument(
        parser,
        "--quantize-activations",
        "-qa",
        nargs=0,
        reason="activation quantization (nvfp4, mxfp8 models) is not checked against the lazy "
        "engine; run mlx_lm.generate -qa",
    )


def check_mlx_lm_options(args: argparse.Namespace) -> dict[str, Any]:
    """mlx-lm's KV cache options for the baseline's generate_step; ValueError, with the reason,
    where they cannot apply. Checked before any model is loaded."""
    if args.prefill_response is not None and (args.ignore_chat_template or args.prompt_cache_file):
        raise ValueError(
            "--prefill-response continues the assistant's turn of the chat template: it cannot be "
            "used with --ignore-chat-template or --prompt-cache-file."
        )
    check_default_chat_template(args, "the model's own template is used when it has one")
    if args.draft_model is not None or args.num_draft_tokens is not None:
        flag = "--draft-model" if args.draft_model is not None else "--num-draft-tokens"
        raise ValueError(
            f"{flag} is not supported: {SPECULATIVE_REASON}; for plain mlx-lm, run "
            "mlx_lm.generate --draft-model."
        )
    options = kv_cache_options(args)
    if not options:
        return options
    flags = kv_cache_flags(options)
    if args.compare:
        raise ValueError(f"{flags} cannot be used with --compare: {KV_CACHE_REASON}.")
    if args.prompt_cache_file:
        raise ValueError(f"{flags} cannot be used with --prompt-cache-file: {KV_CACHE_REASON}.")
    if args.schedule != "off":
        raise ValueError(f"{flags} need --schedule off (plain mlx-lm): {KV_CACHE_REASON}.")
    return options


def prompt_tokens(tokenizer, text: str, args: argparse.Namespace) -> list[int]:
    """The chat template is applied here, as mlx-lm's CLI does, never silently by the API."""
    use_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_template:
        messages = []
        if args.system_prompt is not None:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": text})
        prefill = args.prefill_response is not None
        if prefill:  # the answer goes on from this text, as mlx_lm.generate's
            messages.append({"role": "assistant", "content": args.prefill_response})
        extra = chat_template_config(args)
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not prefill,
                continue_final_message=prefill, **extra,
            )  # fmt: skip
        except Exception as error:  # jinja2's TemplateError, a raise_exception() in the template
            raise ValueError(f"the chat template failed: {error}") from None
    return tokenizer.encode(text, add_special_tokens=not use_template)


def run_once(
    model, tokenizer, tokens, lazy, args, label: str, echo: bool, prompt_cache=None, **options
) -> dict[str, Any]:
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )  # fmt: skip
    run = generate_once(
        model,
        tokenizer,
        tokens,
        lazy,
        max_tokens=args.max_tokens,
        on_text=(lambda text: print(text, end="", flush=True)) if echo else None,
        sampler=sampler,
        prefill_step_size=args.prefill_step_size,
        prompt_progress_callback=progress_bar(label),
        prompt_cache=prompt_cache,
        **options,
    )
    if echo:
        print()
    record = run.record()
    return dict(
        schedule=lazy.to_string() if lazy is not None else "baseline",
        preset=lazy.name if lazy is not None else None,
        source=lazy.source if lazy is not None else None,
        text=run.text,
        tokens=run.generated_tokens,  # the EOS token is reported, not generated text
        **{name: record[name] for name in _RECORDED},
    )


# What `generate --compare` reports of each run, in this order.
_RECORDED = (
    "ttft", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory_gb",
    "finish_reason", "total_time", "prefill_fraction", "revived", "aux_bytes",
    "prefill_tokens_per_layer",
)  # fmt: skip


def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    prefix = common_prefix_len(a, b)
    return dict(identical=a == b, common_prefix=prefix, prefix_fraction=prefix_fraction(a, b))


def unpruned_reason(lazy: LazyConfig, prompt_tokens: int) -> str:
    """Why a lazy run computed every token-layer."""
    if prompt_tokens < lazy.min_prompt_tokens:
        return (
            f"the prompt's {prompt_tokens} tokens are fewer than the schedule's "
            f"min={lazy.min_prompt_tokens} (shorter prompts gain nothing from pruning)"
        )
    return "the schedule kept every token of this prompt"


def print_comparison(base: dict, lazy: dict, agree: dict, unpruned: str | None = None) -> None:
    """unpruned: why nothing was pruned, when nothing was: then no speed-up is claimed."""
    rows = [
        ("TTFT (s)", "ttft", "{:.3f}"),
        ("prompt tokens/s", "prompt_tps", "{:.1f}"),
        ("generation tokens/s", "generation_tps", "{:.1f}"),
        ("generated tokens", "generation_tokens", "{}"),
        ("peak memory (GB)", "peak_memory_gb", "{:.3f}"),
        ("prefill fraction", "prefill_fraction", "{:.3f}"),
    ]
    print(f"{'':<22}{'baseline':>14}{'lazy':>14}")
    for title, key, fmt in rows:
        cells = [fmt.format(r[key]) if r[key] is not None else "1.000*" for r in (base, lazy)]
        print(f"{title:<22}{cells[0]:>14}{cells[1]:>14}")
    if unpruned is None:
        speedup = f"×{base['ttft'] / lazy['ttft']:.2f}"
        print(f"{'TTFT speed-up':<22}{'':>14}{speedup:>14}")
    else:
        print(f"{'TTFT speed-up':<22}{'':>14}{'none':>14}")
    named = f"{lazy['preset']} = " if lazy.get("preset") else ""
    print(f"schedule: {named}{lazy['schedule']}   (* baseline computes every token at every layer)")
    if lazy.get("source"):
        print(f"schedule source: {lazy['source']}")
    if unpruned is not None:
        print(
            f"nothing was pruned: {unpruned}; both runs did the same work, so their TTFT "
            "difference is noise or the engine's, not LazyLLM's"
        )
    if agree["identical"]:
        print(f"agreement: identical generations ({len(base['tokens'])} tokens)")
    else:
        print(
            f"agreement: first {agree['common_prefix']} tokens identical, then they differ "
            f"({agree['prefix_fraction']:.0%} of the longer generation)"
        )
    for name, run in (("baseline", base), ("lazy", lazy)):
        print(f"--- {name} ---\n{run['text']}")


def load_model(args: argparse.Namespace, model: str | None) -> tuple[Any, Any]:
    """The model and tokenizer with mlx-lm's loading flags: an adapter, trusted remote code
    (only when asked), extra end-of-generation tokens (generate's own flag)."""
    trust = bool(args.trust_remote_code)
    loader = distributed_loader(args, model) if distributed.is_launched() else load
    if args.adapter_path is None and not trust:
        model, tokenizer = loader(model)
    else:
        model, tokenizer = loader(
            model,
            adapter_path=args.adapter_path,
            trust_remote_code=trust,
            tokenizer_config={"trust_remote_code": True} if trust else None,
        )
    warn_if_quantized_on_cpu(model)
    add_eos_tokens(tokenizer, getattr(args, "extra_eos_token", ()), "--extra-eos-token")
    return model, tokenizer


def distributed_loader(args: argparse.Namespace, model: str | None) -> Callable[..., Any]:
    """Under mlx.launch: tensor parallel over the launched ranks, or pipeline parallel when asked
    (--pipeline) or when the model's heads do not split over them (said on rank 0)."""
    group = distributed.world()
    refusal = None if args.pipeline else distributed.tensor_refusal(model, group)
    if not (args.pipeline or refusal):
        return distributed.load_sharded
    if refusal and group.rank() == 0:
        print(f"pipeline parallel: {refusal.split(';')[0]}", file=sys.stderr)
    return partial(distributed.load_sharded, pipeline_group=group)


def add_eos_tokens(tokenizer: Any, tokens: Sequence[str], flag: str) -> None:
    """More tokens (text or ids) that end a generation; ValueError naming `flag` for one the
    tokenizer does not know."""
    for token in tokens:
        try:
            tokenizer.add_eos_token(token)
        except ValueError as error:
            raise ValueError(f"{flag}: {error}") from None


def run(args: argparse.Namespace) -> int:
    text = read_prompt(args, DEFAULT_PROMPT)
    options = check_mlx_lm_options(args)
    cache = None
    if args.prompt_cache_file:
        if args.compare:
            raise ValueError("--compare runs from scratch; it cannot use --prompt-cache-file.")
        plain = args.schedule == "off"
        check_plain(args.prompt_cache_file, plain)  # before a model is loaded for nothing
        saved = cached_loading(args.prompt_cache_file)
        args.adapter_path = args.adapter_path or saved.adapter_path
        model, tokenizer = load_model(args, args.model or saved.model)
        add_eos_tokens(tokenizer, saved.eos_tokens, f"{args.prompt_cache_file}'s --eos-token")
        lazy, tokens, cache = continue_from_file(
            args.prompt_cache_file,
            model,
            tokenizer,
            text,
            None if args.schedule is None or plain else resolve_schedule(model, args.schedule),
            system_prompt=args.system_prompt,
            chat_template=not args.ignore_chat_template,
            plain=plain,
        )
    else:
        model, tokenizer = load_model(args, args.model)
        lazy = resolve_schedule(model, args.schedule)
        tokens = prompt_tokens(tokenizer, text, args)
    echo = args.verbose and not args.json and not args.compare
    report: dict[str, Any] = dict(model=model_label(args.model))
    report["prompt_tokens"] = len(tokens)
    report["cached_tokens"] = per_layer(cache)[0].offset if cache is not None else 0
    if args.compare:
        if lazy is None:
            raise ValueError("--compare needs a LazyLLM schedule, not 'off'.")
        warm_up(model, tokenizer, tokens, (None, lazy))
        runs = {
            "baseline": run_once(model, tokenizer, tokens, None, args, "baseline", echo),
            "lazy": run_once(model, tokenizer, tokens, lazy, args, "lazy", echo),
        }
        report["agreement"] = agreement(runs["baseline"]["tokens"], runs["lazy"]["tokens"])
        report["pruned"] = runs["lazy"]["prefill_fraction"] < 1.0
    else:
        label = "lazy" if lazy is not None else "baseline"
        runs = {
            label: run_once(model, tokenizer, tokens, lazy, args, label, echo, cache, **options)
        }
    report["runs"] = runs
    if args.json:
        print(json.dumps(report))
    elif args.compare:
        print(f"model: {report['model']}, prompt: {len(tokens)} tokens")
        unpruned = None if report["pruned"] else unpruned_reason(lazy, len(tokens))
        print_comparison(runs["baseline"], runs["lazy"], report["agreement"], unpruned)
    elif args.verbose:
        (result,) = runs.values()
        print("=" * 10)
        cached = f" (+{report['cached_tokens']} cached)" if report["cached_tokens"] else ""
        print(f"Prompt: {len(tokens)} tokens{cached}, {result['prompt_tps']:.3f} tokens-per-sec")
        print(f"Time to first token: {result['ttft']:.3f} s ({result['schedule']})")
        if result.get("source"):
            print(f"Schedule source: {result['source']}")
        print(
            f"Generation: {result['generation_tokens']} tokens, "
            f"{result['generation_tps']:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {result['peak_memory_gb']:.3f} GB")
        if result["prefill_fraction"] is not None:
            print(f"Prefill computed {result['prefill_fraction']:.1%} of prompt token-layers")
    else:
        (result,) = runs.values()
        print(result["text"])
    return 0
