"""The lazy cache: one KV store per stage, an aux cache and an observation window per boundary
(stores.py), and the protocol mlx-lm's caches speak, so it is passed, trimmed, measured, saved
and loaded as theirs are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .config import LazyConfig, Schedule
from .pruning import scoring_layer
from .stores import AuxStore, ObservedQueries, StageStore, round_up


@dataclass
class LazyCache:
    """Everything LazyLLM keeps between calls: pass it back to continue a conversation.

    Storage only, speaking mlx-lm's cache protocol (offset, state, meta_state, from_state,
    is_trimmable, trim, empty, nbytes). `config` and `schedule` say what it was built for
    (checked when it is continued, saved with it); the engine takes its policy elsewhere.
    """

    config: LazyConfig
    schedule: Schedule
    stages: list[StageStore] = field(default_factory=list)
    aux: list[AuxStore | None] = field(default_factory=list)  # aux[k] feeds stage k; aux[0] None
    observed: list[ObservedQueries | None] = field(default_factory=list)  # ranks for boundary k
    offset: int = 0  # tokens processed so far = the next token's position
    position_capacity: int = 0

    @classmethod
    def create(
        cls, config: LazyConfig, schedule: Schedule, windows: list[int | None] | None = None
    ) -> LazyCache:
        """An empty cache. windows: each layer's sliding window (None: full attention). The
        first stage's window layers then keep only their window, except the layer that scores
        tokens (which scores every candidate: see pruning.scoring_layer)."""
        stages = [StageStore(layers) for layers in schedule.stages]
        if windows is not None:
            first = schedule.stages[0]
            scoring = scoring_layer(first, windows) if schedule.boundaries else None
            stages[0].keep_last = [None if i == scoring else windows[i] for i in first]
        aux = [None] + [AuxStore() for _ in schedule.boundaries]
        observed = [None] + [ObservedQueries(config.window) for _ in schedule.boundaries]
        return cls(config=config, schedule=schedule, stages=stages, aux=aux, observed=observed)

    def empty(self) -> bool:
        """Whether it holds no token (mlx-lm's `empty()`)."""
        return self.offset == 0

    def reserve_positions(self, count: int) -> None:
        needed = self.offset + count
        if needed <= self.position_capacity:
            return
        self.position_capacity = round_up(needed)
        for store in self.stages:
            store.grow_positions(self.position_capacity)
        for aux in self.aux[1:]:
            aux.grow_positions(self.position_capacity)

    def trim(self, num_tokens: int) -> int:
        """Forget the last `num_tokens` tokens (like mlx-lm's cache.trim); returns how many:
        0 when sliding-window layers no longer hold the keys that would be needed again."""
        num_tokens = max(0, min(num_tokens, self.offset))
        if not all(store.can_keep_before(self.offset - num_tokens) for store in self.stages):
            return 0  # window layers dropped keys the next token would need (mlx-lm: same)
        if num_tokens:
            self.offset -= num_tokens
            for store in self.stages:
                store.keep_before(self.offset)
            for aux in self.aux[1:]:
                aux.keep_before(self.offset)
            for window in self.observed[1:]:
                window.keep_before(self.offset)
        return num_tokens

    def is_trimmable(self) -> bool:
        """Always: but trim() forgets nothing where sliding windows dropped the keys (see trim)."""
        return True

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        """Bytes held: every stage's KV, the aux caches' hidden states, the observed queries."""
        aux = sum(a.hidden[: a.size].nbytes for a in self.aux[1:] if a.hidden is not None)
        observed = sum(w.queries.nbytes for w in self.observed[1:] if w.queries is not None)
        return self.kv_bytes() + aux + observed

    @property
    def state(self) -> dict[str, mx.array]:
        """Every array it holds, by name: what mx.eval settles. The position lookups
        (`*.index_of`, `*.row_of`) are rebuilt from the positions by from_state; contents()
        is the rest, what a file keeps."""
        arrays = self.contents()
        for k, store in enumerate(self.stages):
            arrays[f"stage{k}.index_of"] = store.index_of
        for k, aux in enumerate(self.aux[1:], start=1):
            arrays[f"aux{k}.row_of"] = aux.row_of
        return arrays

    def contents(self) -> dict[str, mx.array]:
        """The tokens it holds, by name: each stage's positions and each layer's KV (from the
        layer's first held entry), the aux caches' waiting hidden states and the observation
        windows' queries."""
        arrays: dict[str, mx.array] = {}
        for k, store in enumerate(self.stages):
            arrays[f"stage{k}.positions"] = store.positions[: store.size]
            for j, (keys, values) in enumerate(zip(store.keys, store.values)):
                if keys is not None:
                    arrays[f"stage{k}.layer{j}.keys"] = keys[..., : store.held(j), :]
                    arrays[f"stage{k}.layer{j}.values"] = values[..., : store.held(j), :]
        for k, aux in enumerate(self.aux):
            if aux is not None and aux.hidden is not None:
                arrays[f"aux{k}.positions"] = aux.positions[: aux.size]
                arrays[f"aux{k}.hidden"] = aux.hidden[: aux.size]
        for k, window in enumerate(self.observed):
            if window is not None and window.queries is not None:
                arrays[f"observed{k}.positions"] = window.positions
                arrays[f"observed{k}.queries"] = window.queries
        return arrays

    @property
    def meta_state(self) -> dict[str, Any]:
        """Its scalars, JSON-ready: the schedule it was built for, the tokens it has seen, and
        each stage's order and windowed layers' first held entries."""
        return dict(
            config=self.config.to_dict(),
            offset=self.offset,
            sorted=[store.sorted for store in self.stages],
            bases=[store.base for store in self.stages],
        )

    @classmethod
    def from_state(
        cls,
        state: dict[str, mx.array],
        meta_state: dict[str, Any],
        windows: list[int | None],
    ) -> LazyCache:
        """The cache that `state` (or `contents()`) and `meta_state` describe, for a model with
        these sliding windows (one per layer; unlike mlx-lm's caches, one LazyCache spans every
        layer). KeyError/ValueError/IndexError when they do not fit together."""
        config = LazyConfig.from_dict(meta_state["config"])
        cache = cls.create(config, config.resolve(len(windows)), windows)
        cache.reserve_positions(meta_state["offset"])
        cache.offset = meta_state["offset"]
        for k, store in enumerate(cache.stages):
            bases = meta_state["bases"][k] if "bases" in meta_state else [0] * len(store.layers)
            layers = range(len(store.layers))
            keys = [state.get(f"stage{k}.layer{j}.keys") for j in layers]
            values = [state.get(f"stage{k}.layer{j}.values") for j in layers]
            positions, in_order = state[f"stage{k}.positions"], meta_state["sorted"][k]
            store.restore(positions, keys, values, in_order, bases, k)
        for k, aux in enumerate(cache.aux):
            if aux is not None and f"aux{k}.hidden" in state:
                aux.append(state[f"aux{k}.positions"], state[f"aux{k}.hidden"])
        for k, window in enumerate(cache.observed):
            if window is not None and f"observed{k}.queries" in state:
                queries = state[f"observed{k}.queries"]
                window.restore(state[f"observed{k}.positions"], queries, cache.offset, k)
        return cache

    def kv_bytes(self) -> int:
        return sum(store.nbytes() for store in self.stages)

    def aux_bytes(self) -> int:
        """Bytes of hidden states still waiting in aux caches (revived rows no longer count)."""
        waiting = [aux.nbytes_waiting(stage) for aux, stage in zip(self.aux[1:], self.stages[1:])]
        return int(sum(int(w.item()) for w in waiting))

    def tokens_per_layer(self) -> list[int]:
        """How many tokens hold KV at each layer."""
        return [store.size for store in self.stages for _ in store.layers]


def per_layer(cache: LazyCache | list[Any]) -> list[Any]:
    """A prompt cache as mlx-lm's list of per-layer caches: mlx-lm's is one already, a LazyCache
    (one for all layers) is a list of one. Each entry speaks mlx-lm's cache protocol (offset,
    is_trimmable, trim, state, nbytes)."""
    return [cache] if isinstance(cache, LazyCache) else cache
