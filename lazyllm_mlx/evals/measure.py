"""One generation, run and recorded, and the warm-up before timed ones: what `generate --compare`,
`bench` and `eval` share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import LazyConfig
from ..generate import GenerationResponse, stream_generate
from ..stats import lazy_fields

# A warm-up prompt this long is pruned by the presets too (they leave prompts under 256 alone).
WARM_UP_TOKENS = 320


@dataclass
class Generated:
    """What one stream_generate call gave."""

    tokens: list[int]  # every response's token: the EOS one too when the generation stopped there
    text: str
    token_times: list[float]  # seconds from the call to each response
    first_logprobs: np.ndarray | None  # the first token's distribution, when asked for
    last: GenerationResponse  # the final counters: TTFT, tokens/s, peak memory, LazyLLM stats

    @property
    def generated_tokens(self) -> list[int]:
        """The generated text's tokens: without the EOS token that ended it."""
        return self.tokens[:-1] if self.last.finish_reason == "stop" else self.tokens

    @property
    def total_time(self) -> float:
        """Seconds from the call to the last response."""
        return self.token_times[-1]

    def record(self) -> dict[str, Any]:
        """The run's figures by the names the reports give them (LazyLLM's None for the
        baseline): what `generate --compare`, `bench` and `eval` keep of a run."""
        last = self.last
        return dict(
            ttft=last.ttft,
            prompt_tps=last.prompt_tps,
            generation_tokens=last.generation_tokens,
            generation_tps=last.generation_tps,
            peak_memory_gb=last.peak_memory,
            finish_reason=last.finish_reason,
            total_time=self.total_time,
            **lazy_fields(last.lazy),
        )


def generate_once(
    model: Any,
    tokenizer: Any,
    prompt: Sequence[int],
    lazy: LazyConfig | None,
    *,
    max_tokens: int,
    first_logprobs: bool = False,
    on_text: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> Generated:
    """Run stream_generate from a clear memory cache and peak; `on_text` sees each piece of text.
    Other keyword arguments go to stream_generate (sampler, prefill_step_size, prompt_cache…)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, texts, times, first = [], [], [], None
    start = time.perf_counter()
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, lazy=lazy, **kwargs
    ):
        times.append(time.perf_counter() - start)
        if first_logprobs and first is None:
            first = np.array(response.logprobs.astype(mx.float32))
        tokens.append(response.token)
        texts.append(response.text)
        if on_text is not None:
            on_text(response.text)
    return Generated(tokens, "".join(texts), times, first, response)


def warm_up(
    model: Any, tokenizer: Any, prompt: Sequence[int], lazies: Iterable[LazyConfig | None]
) -> None:
    """One-time costs (allocation, kernels) off the clock: two tokens after the prompt's last
    WARM_UP_TOKENS tokens with each schedule."""
    short = list(prompt[-WARM_UP_TOKENS:])
    for lazy in lazies:
        generate_once(model, tokenizer, short, lazy, max_tokens=2)
