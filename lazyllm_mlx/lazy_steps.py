"""One lazy request, token by token: its prefill, then its decode steps, each sampled, in
mlx-lm's one-step-ahead order wherever a step never waits on the host (generate_step's lazy side).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import greedy_sampler

from .cache import LazyCache
from .config import LazyConfig
from .engine import decode_step, prefill
from .runner import Runner, Selections, runner_for
from .stats import LazyStats

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def lazy_generate_step(
    prompt: mx.array,
    model: nn.Module,
    config: LazyConfig,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: LazyCache | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    stats: LazyStats | None = None,
    **baseline_kwargs: Any,
) -> Generator[tuple[int, mx.array], None, None]:
    """The lazy engine's steps (generate_step's defaults; `config` resolved for `model`)."""
    if baseline_kwargs:
        raise ValueError(f"Options not supported by the lazy engine: {sorted(baseline_kwargs)}")
    runner = runner_for(model, config)
    cache = prompt_cache if prompt_cache is not None else new_cache(runner, config)
    stats = stats if stats is not None else LazyStats(runner.family.num_layers)
    progress = prompt_progress_callback or (lambda *_: None)
    step = RequestSteps(runner, cache, stats, sampler or greedy_sampler, logits_processors)
    total = prompt.size
    progress(0, total)
    y, logprobs = step.prefill(prompt, prefill_step_size, progress)
    mx.async_eval(y, logprobs)
    # A decode step that selects waits on the host at every boundary, so computing it before
    # handing out the current token (mlx-lm's one-step-ahead order) would only delay the token,
    # the first one included. Such a step is fed after the token is handed out; the others
    # (no revival, or a step that keeps its selections: every=N) are computed ahead, as mlx-lm's.
    unfed = None
    n = 0
    try:
        while True:
            ahead = n != max_tokens and step.ahead()
            if ahead:
                next_y, next_logprobs = step.decode(y, prefill_step_size)
                mx.async_eval(next_y, next_logprobs)
            if n == 0:
                mx.eval(y)
                progress(total, total)
            if n == max_tokens:
                break
            unfed = None if ahead else y
            yield y.item(), logprobs
            if not ahead:
                unfed = None
                next_y, next_logprobs = step.decode(y, prefill_step_size)
                mx.async_eval(next_y, next_logprobs)
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs = next_y, next_logprobs
            n += 1
    except GeneratorExit:
        if unfed is not None:  # closed right after a token: the cache still takes it, as mlx-lm's
            mx.eval(step.decode(unfed, prefill_step_size))
        raise


class RequestSteps:
    """One request's engine calls, each sampled: its prefill, then its decode steps. `ahead`
    decides their order against handing out tokens (tools compare both orders)."""

    def __init__(
        self,
        runner: Runner,
        cache: LazyCache,
        stats: LazyStats,
        sampler: Sampler,
        logits_processors: list[LogitsProcessor] | None,
    ):
        self.runner, self.cache, self.stats = runner, cache, stats
        self.sampler, self.logits_processors = sampler, logits_processors
        self.selections = Selections()
        self.seen: mx.array | None = None

    def prefill(
        self, tokens: mx.array, step_size: int, progress: Callable[[int, int], None]
    ) -> tuple[mx.array, mx.array]:
        with mx.stream(generation_stream):
            logits, self.selections = prefill(
                self.runner, self.cache, tokens, self.stats, step_size=step_size, progress=progress
            )
            return self._sample(tokens, logits)

    def decode(self, tokens: mx.array, step_size: int) -> tuple[mx.array, mx.array]:
        with mx.stream(generation_stream):
            args = (self.runner, self.cache, tokens, self.stats, self.selections, step_size)
            return self._sample(tokens, decode_step(*args))

    def ahead(self) -> bool:
        """Whether the next decode step may be computed before the current token is handed
        out: it does not select, or it keeps its selections (it never waits on the host)."""
        selections = self.selections
        return not selections.selecting or selections.kept_by_next_step(self.runner)

    def _sample(self, tokens: mx.array, logits: mx.array) -> tuple[mx.array, mx.array]:
        if self.logits_processors:
            self.seen = tokens if self.seen is None else mx.concatenate([self.seen, tokens])
            for processor in self.logits_processors:
                logits = processor(self.seen, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return self.sampler(logprobs), logprobs.squeeze(0)


def new_cache(runner: Runner, config: LazyConfig) -> LazyCache:
    """An empty cache for the runner's schedule, built for `config` (the runner's, up to its
    name and source, which the cache keeps)."""
    return LazyCache.create(config, runner.schedule, runner.family.windows)
