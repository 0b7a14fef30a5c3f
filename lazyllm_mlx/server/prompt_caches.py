"""The prompt caches `lazyllm-mlx serve` keeps between requests, one per schedule.

Each slot holds the tokens the last request of that schedule left in its cache (prompt and
generated tokens) and the cache itself: a LazyCache, or mlx-lm's list of KV caches for plain mlx-lm.
A request takes its schedule's slot, the cache is trimmed back to the prefix the two share (keeping
at least one new token to prefill), and the request prefills only the rest. The least recently
used slots go when there are more than `max_slots`, or when they hold more than `max_bytes` (as
mlx-lm's `--prompt-cache-bytes`). Not thread-safe: the server uses it under its generation lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.utils import common_prefix_len


def _per_layer(cache: Any) -> list:
    """mlx-lm's prompt cache is a list of per-layer caches; a LazyCache is one for all layers.
    Either way each speaks mlx-lm's cache protocol (offset, is_trimmable, trim, state)."""
    return cache if isinstance(cache, list) else [cache]


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a LazyCache or an mlx-lm list cache."""
    return sum(c.nbytes for c in _per_layer(cache))


def cache_offset(cache: Any) -> int:
    """Tokens held by a LazyCache or an mlx-lm list cache."""
    return _per_layer(cache)[0].offset


def trim_cache(cache: Any, num_tokens: int) -> bool:
    """Forget the last `num_tokens` tokens; False when the cache cannot be trimmed."""
    if num_tokens <= 0:
        return True
    layers = _per_layer(cache)
    return can_trim_prompt_cache(layers) and trim_prompt_cache(layers, num_tokens) == num_tokens


@dataclass
class _Slot:
    tokens: list[int]
    cache: Any


class PromptCaches:
    """Per key (a schedule), the last request's tokens and cache; the least recently used go
    beyond `max_slots` slots or `max_bytes` bytes (None: no byte limit)."""

    def __init__(self, max_slots: int = 4, max_bytes: int | None = None):
        self.max_slots, self.max_bytes = max_slots, max_bytes
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return sum(cache_nbytes(slot.cache) for slot in self._slots.values())

    def held_tokens(self) -> dict[str, int]:
        """Tokens each slot holds, by key (most recent last)."""
        return {key: len(slot.tokens) for key, slot in self._slots.items()}

    def clear(self) -> None:
        self._slots.clear()

    def take(self, key: str, prompt: Sequence[int], make: Callable[[], Any]) -> tuple[Any, int]:
        """A cache for `prompt` and how many of its tokens it already holds.

        The slot is removed while in use, so a generation that fails leaves no half-written cache.
        """
        slot = self._slots.pop(key, None)
        if slot is not None:
            reused = min(common_prefix_len(slot.tokens, prompt), len(prompt) - 1)
            if reused > 0 and trim_cache(slot.cache, cache_offset(slot.cache) - reused):
                return slot.cache, reused
        return make(), 0

    def put(self, key: str, tokens: list[int], cache: Any) -> None:
        """Keep `cache`, which holds `tokens` (a longer list is cut to what the cache holds)."""
        held = cache_offset(cache)
        if held > len(tokens) and not trim_cache(cache, held - len(tokens)):
            return
        self._slots[key] = _Slot(list(tokens[: cache_offset(cache)]), cache)
        self._slots.move_to_end(key)
        dropped = False
        while len(self._slots) > self.max_slots or (
            self._slots and self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            self._slots.popitem(last=False)
            dropped = True
        if dropped:
            mx.clear_cache()  # give the freed buffers back, not only to MLX's pool


def settle(cache: Any) -> None:
    """Evaluate pending cache writes: the next request may run on another thread."""
    state = [c.state for c in _per_layer(cache)]
    mx.eval([a for _, a in tree_flatten(state) if isinstance(a, mx.array)])
