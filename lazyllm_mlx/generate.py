"""generate_step → stream_generate → generate, following mlx-lm, with LazyLLM prefill and decoding.

`lazy=None` is plain mlx-lm (the baseline: its own generate_step runs); a LazyConfig, a preset name
or a schedule string runs the lazy engine. Responses add `ttft` (seconds to the first token) and
`lazy` (the request's LazyStats, None for the baseline) to mlx-lm's fields.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import LazyCache
from .calibration import resolve_preset
from .config import LazyConfig, as_config
from .lazy_steps import LogitsProcessor, Sampler, lazy_generate_step, new_cache
from .pipeline import pipeline_of
from .runner import runner_for
from .stats import LazyStats


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: mlx-lm's fields, plus `ttft` and `lazy`."""

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    ttft: float  # seconds from the call to the first token
    lazy: LazyStats | None
    finish_reason: str | None = None
    from_draft: bool = False


def for_model(lazy: LazyConfig | str | dict | None, model: nn.Module) -> LazyConfig | None:
    """The schedule `lazy` names, as it applies to `model`: a preset the model has a calibration
    of (its own, or one shipped for its architecture) becomes that calibration."""
    config = as_config(lazy)
    return None if config is None else resolve_preset(config, model)


def make_lazy_cache(model: nn.Module, lazy: LazyConfig | str | dict) -> LazyCache:
    """An empty lazy prompt cache for `model`, to pass as `prompt_cache` and keep across turns."""
    config = for_model(lazy, model)
    if config is None:
        raise ValueError(
            "make_lazy_cache needs a schedule; use mlx_lm's make_prompt_cache for None."
        )
    return _new_cache(model, config)


def _new_cache(model: nn.Module, config: LazyConfig) -> LazyCache:
    """An empty cache for a schedule already resolved for `model` (for_model)."""
    return new_cache(runner_for(model, config), config)


def default_schedule(model: nn.Module) -> LazyConfig:
    """The schedule to run `model` with when none is asked for: the one stored with it by
    `convert --schedule`, else `default` as it applies to the model (its calibration, else the
    generic layout)."""
    stored = getattr(model, "lazyllm_schedule", None)
    if stored is not None:
        return as_config(stored)
    return for_model("default", model)


def resolve_schedule(model: nn.Module, name: str | None) -> LazyConfig | None:
    """The schedule a command line names: "off" is plain mlx-lm (None), None the model's
    default_schedule, anything else a preset or schedule string."""
    if name == "off":
        return None
    if name is None:
        return default_schedule(model)
    return for_model(name, model)


def context_length(model: nn.Module) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def check_request(
    model: nn.Module, prompt: mx.array, config: LazyConfig | None, cache: Any = None
) -> None:
    """Every error a request can have, raised before any work is done."""
    if prompt.size == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    if config is None and isinstance(cache, LazyCache):
        raise ValueError("A LazyCache was given with lazy=None; pass the cache's schedule.")
    if config is not None and cache is not None and not isinstance(cache, LazyCache):
        raise ValueError(
            f"prompt_cache is a {type(cache).__name__}; the lazy engine needs a LazyCache "
            "(make_lazy_cache(model, lazy))."
        )
    offset = cache.offset if config is not None and cache is not None else 0
    limit = context_length(model)
    if limit is not None and offset + prompt.size > limit:
        raise ValueError(
            f"The prompt has {prompt.size} tokens"
            + (f" (+{offset} already in the cache)" if offset else "")
            + f", more than the model's context of {limit} tokens."
        )
    if config is None:
        return
    runner = runner_for(model, config)  # raises for an architecture or schedule that cannot run
    if cache is not None and cache.schedule != runner.schedule:
        raise ValueError("prompt_cache was built with a different schedule than `lazy`.")


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    lazy: LazyConfig | str | dict | None = None,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: Any = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    stats: LazyStats | None = None,
    **baseline_kwargs: Any,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) like mlx-lm's generate_step; `lazy` picks the engine.

    stats: a LazyStats to fill with this request's counters (lazy only). One generation runs on a
    model at a time: another thread's waits until this one is exhausted or closed (MLX evaluates
    on one stream; two at once crashed).
    """
    yield from _locked_steps(
        prompt, model, for_model(lazy, model), max_tokens=max_tokens, sampler=sampler,
        logits_processors=logits_processors, prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size, prompt_progress_callback=prompt_progress_callback,
        stats=stats, **baseline_kwargs,
    )  # fmt: skip


def _locked_steps(
    prompt: mx.array, model: nn.Module, config: LazyConfig | None, **options: Any
) -> Generator[tuple[int, mx.array], None, None]:
    """generate_step for a schedule already resolved for `model` (for_model), under its lock."""
    with model_lock(model):
        if config is None and pipeline_of(model) is not None:
            # mlx-lm's model call cannot run one rank's share of the layers: the engine, unpruned
            config = as_config("none")
        if config is None:
            options.pop("stats", None)
            yield from mlx_generate_step(prompt, model, **options)
        else:
            yield from lazy_generate_step(prompt, model, config, **options)


_LOCKS = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The model's generation lock (re-entrant: one thread may interleave its generators)."""
    with _LOCKS:
        lock = getattr(model, "_lazyllm_lock", None)
        if lock is None:
            lock = threading.RLock()
            object.__setattr__(model, "_lazyllm_lock", lock)  # not a parameter or child
    return lock


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """`text` as tokens by mlx-lm's rule: special tokens added unless it starts with BOS."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))


def _as_tokens(tokenizer: TokenizerWrapper, prompt: str | mx.array | list[int]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    return mx.array(prompt, dtype=mx.int32)


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    max_tokens: int = 256,
    *,
    lazy: LazyConfig | str | dict | None = None,
    prompt_cache: Any = None,
    should_stop: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Stream GenerationResponses; raises bad-input errors at call time, before any work.

    should_stop: called after every token; True ends the stream with finish_reason "cancelled".
    Closing the generator also stops it. Either way the prompt cache stays consistent: it holds
    the prompt and every generated token that was yielded (its `offset` says how many tokens).
    Other keyword arguments go to `generate_step` (sampler, logits_processors,
    prefill_step_size, prompt_progress_callback).
    """
    if max_tokens == 0:
        raise ValueError("Maximum number of tokens must be non-zero (use -1 for no limit).")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    config = for_model(lazy, model)
    tokens = _as_tokens(tokenizer, prompt)
    check_request(model, tokens, config, prompt_cache)
    stats = None
    if config is not None:
        stats = LazyStats(len(model.layers))
        if prompt_cache is None:
            prompt_cache = _new_cache(model, config)
    steps = _locked_steps(
        tokens, model, config, max_tokens=max_tokens, prompt_cache=prompt_cache, stats=stats,
        **kwargs,
    )  # fmt: skip
    return _stream(model, tokenizer, tokens, max_tokens, steps, prompt_cache, stats, should_stop)


def _stream(model, tokenizer, tokens, max_tokens, steps, cache, stats, should_stop):
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()

    def response(token, logprobs, n, finish_reason=None):
        if stats is not None and finish_reason is not None:  # lazy: the cache is a LazyCache
            stats.aux_bytes = cache.aux_bytes()
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            prompt_tokens=tokens.size,
            prompt_tps=tokens.size / prompt_time,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            ttft=prompt_time,
            lazy=stats,
            finish_reason=finish_reason,
        )

    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_time = 0.0
        for n, (token, logprobs) in enumerate(steps):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if (n + 1) == max_tokens or (should_stop is not None and should_stop()):
                break
            yield response(token, logprobs, n)
        detokenizer.finalize()
        if token in tokenizer.eos_token_ids:
            reason = "stop"
        elif (n + 1) == max_tokens:
            reason = "length"
        else:
            reason = "cancelled"
        yield response(token, logprobs, n, finish_reason=reason)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole generation as text; `verbose` prints it as it comes, then timings and stats."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Time to first token: {response.ttft:.3f} s")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        if response.lazy is not None:
            s = response.lazy
            print(
                f"LazyLLM: prefill computed {s.prefill_fraction:.1%} of prompt token-layers "
                f"(ideal ×{s.ideal_prefill_speedup:.2f}), {s.revived} tokens revived"
            )
    return text
