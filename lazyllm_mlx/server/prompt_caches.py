"""The prompt caches `lazyllm-mlx serve` keeps between requests, several per schedule.

Each slot holds the tokens a request left in its cache (prompt and generated tokens), the cache
itself (a LazyCache, or mlx-lm's list of KV caches for plain mlx-lm) and its schedule. A request
takes the slot of its schedule that shares the longest prefix with its prompt, the cache is trimmed
back to that prefix (keeping at least one new token to prefill), and the request prefills only the
rest. A prompt that shares less than half of every cache starts a new one and leaves the others
alone, so a short unrelated request does not evict a long conversation. Prefixes are matched on
the token ids each cache was built from (a pruned cache cannot tell them). The least recently used
slots go when there are more than `max_slots`, or when they hold more than `max_bytes` (as
mlx-lm's `--prompt-cache-size` and `--prompt-cache-bytes`). Not thread-safe: the server uses it
from its generation thread only.
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

from ..cache import per_layer


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a LazyCache or an mlx-lm list cache."""
    return sum(c.nbytes for c in per_layer(cache))


def cache_offset(cache: Any) -> int:
    """Tokens held by a LazyCache or an mlx-lm list cache."""
    return per_layer(cache)[0].offset


def trim_cache(cache: Any, num_tokens: int) -> bool:
    """Forget the last `num_tokens` tokens; False when the cache cannot be trimmed."""
    if num_tokens <= 0:
        return True
    layers = per_layer(cache)
    return can_trim_prompt_cache(layers) and trim_prompt_cache(layers, num_tokens) == num_tokens


@dataclass
class _Slot:
    key: str  # the schedule the cache was built with
    tokens: list[int]
    cache: Any


class PromptCaches:
    """Caches with the tokens they hold and their schedule; the least recently used go beyond
    `max_slots` slots or `max_bytes` bytes (None: no byte limit)."""

    def __init__(self, max_slots: int = 4, max_bytes: int | None = None):
        self.max_slots, self.max_bytes = max_slots, max_bytes
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return sum(cache_nbytes(slot.cache) for slot in self._slots.values())

    def held_tokens(self) -> dict[str, int]:
        """Tokens the most recently used slot of each key holds (most recent key last)."""
        held: dict[str, int] = {}
        for slot in self._slots.values():
            held.pop(slot.key, None)
            held[slot.key] = len(slot.tokens)
        return held

    def clear(self) -> None:
        self._slots.clear()

    def take(self, key: str, prompt: Sequence[int], make: Callable[[], Any]) -> tuple[Any, int]:
        """A cache for `prompt` and how many of its tokens it already holds.

        The slot is removed while in use, so a generation that fails leaves no half-written cache.
        """
        shared = {i: common_prefix_len(s.tokens, prompt) for i, s in self._slots.items()
                  if s.key == key}  # fmt: skip
        # a cache is cut back only to a prefix of at least half of it: a chat template's header,
        # all that an unrelated request shares with a long conversation, does not cost it
        shared = {i: n for i, n in shared.items() if 2 * n >= len(self._slots[i].tokens)}
        best = max(shared, key=shared.get, default=None)
        reused = 0 if best is None else min(shared[best], len(prompt) - 1)
        if reused > 0:
            slot = self._slots.pop(best)
            if trim_cache(slot.cache, cache_offset(slot.cache) - reused):
                return slot.cache, reused
        return make(), 0

    def put(self, key: str, tokens: list[int], cache: Any) -> None:
        """Keep `cache`, which holds `tokens` (a longer list is cut to what the cache holds)."""
        held = cache_offset(cache)
        if held > len(tokens) and not trim_cache(cache, held - len(tokens)):
            return
        self._slots[self._next] = _Slot(key, list(tokens[: cache_offset(cache)]), cache)
        self._next += 1
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
    state = [c.state for c in per_layer(cache)]
    mx.eval([a for _, a in tree_flatten(state) if isinstance(a, mx.array)])
