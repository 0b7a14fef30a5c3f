"""Lazy KV state: one KV store per stage (all layers of a stage hold the same tokens), aux caches.

A token enters a stage at its first layer and runs through all of its layers, so every layer of a
stage holds KV for the same tokens in the same order: positions and lookup maps live per stage, key
and value buffers per layer. A token pruned at boundary b keeps its hidden state (the input of layer
b) in the aux cache of that stage until it is revived. Entries are never recomputed: a token has KV
at a stage at most once, which is the "each token at most once per layer" invariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .config import LazyConfig, Schedule

_STEP = 256


def _round_up(n: int) -> int:
    return (n + _STEP - 1) // _STEP * _STEP


def _grow_rows(buf: mx.array, rows: int, axis: int, fill: int | float = 0) -> mx.array:
    """`buf` extended along `axis` to at least `rows` entries, new entries set to `fill`."""
    have = buf.shape[axis]
    if have >= rows:
        return buf
    shape = list(buf.shape)
    shape[axis] = _round_up(rows) - have
    return mx.concatenate([buf, mx.full(shape, fill, dtype=buf.dtype)], axis=axis)


def _rows_before(positions: mx.array, size: int, position: int):
    """(kept positions, their rows) of the entries before `position`; rows None if all are kept."""
    held = np.array(positions[:size])
    kept = np.nonzero(held < position)[0]
    if kept.size == size:
        return held, None
    return held[kept], mx.array(kept.astype(np.int32))


class StageStore:
    """KV for the layers of one stage, the tokens' positions and a position → entry map."""

    def __init__(self, layers: range):
        self.layers = layers
        self.keys: list[mx.array | None] = [None] * len(layers)
        self.values: list[mx.array | None] = [None] * len(layers)
        self.positions = mx.zeros((0,), dtype=mx.int32)
        self.index_of = mx.zeros((0,), dtype=mx.int32)  # position -> entry, -1 when absent
        self.size = 0
        self.sorted = True  # entries are in increasing position order
        self.contiguous = True  # entry i holds position i (stage 0: every token, in order)

    def append(
        self, positions: mx.array, count: int, in_order: bool, first_position: int | None = None
    ) -> int:
        """Reserve entries for `count` tokens; returns the first entry. KV is written per layer.

        first_position: set when `positions` are first_position, first_position + 1, ...
        """
        start = self.size
        self.contiguous = self.contiguous and first_position == start
        self.positions = _grow_rows(self.positions, start + count, 0)
        self.positions[start : start + count] = positions
        self.index_of[positions] = mx.arange(start, start + count, dtype=mx.int32)
        self.size += count
        self.sorted = self.sorted and in_order
        return start

    def write(self, layer: int, start: int, keys: mx.array, values: mx.array) -> None:
        end = start + keys.shape[2]
        for buffers, new in ((self.keys, keys), (self.values, values)):
            buf = buffers[layer]
            if buf is None:
                shape = (*new.shape[:2], _round_up(max(end, self.size)), new.shape[3])
                buf = mx.zeros(shape, dtype=new.dtype)
            buf = _grow_rows(buf, self.size, axis=2)
            buf[..., start:end, :] = new
            buffers[layer] = buf

    def grow_positions(self, capacity: int) -> None:
        self.index_of = _grow_rows(self.index_of, capacity, 0, fill=-1)

    def keep_before(self, position: int) -> None:
        """Forget the tokens at `position` and after (host work: not for the hot path)."""
        held, rows = _rows_before(self.positions, self.size, position)
        if rows is None:
            return
        for buffers in (self.keys, self.values):
            for j, buf in enumerate(buffers):
                if buf is not None:
                    buffers[j] = mx.take(buf[..., : self.size, :], rows, axis=2)
        self.positions = self.positions[rows]
        self.size = rows.size
        self.index_of = mx.full(self.index_of.shape, -1, dtype=mx.int32)
        self.index_of[self.positions] = mx.arange(self.size, dtype=mx.int32)
        self.sorted = bool(np.all(np.diff(held) > 0))

    def nbytes(self) -> int:
        arrays = [a for a in self.keys + self.values if a is not None]
        return sum(a[..., : self.size, :].nbytes for a in arrays)


class AuxStore:
    """Hidden states of tokens pruned at one boundary, waiting to be revived."""

    def __init__(self):
        self.hidden: mx.array | None = None  # (capacity, hidden)
        self.positions = mx.zeros((0,), dtype=mx.int32)
        self.row_of = mx.zeros((0,), dtype=mx.int32)  # position -> row, -1 when absent
        self.size = 0

    def append(self, positions: mx.array, hidden: mx.array) -> None:
        """hidden: (count, hidden_size) rows for `positions`."""
        count = hidden.shape[0]
        if count == 0:
            return
        start, end = self.size, self.size + count
        if self.hidden is None:
            self.hidden = mx.zeros((_round_up(end), hidden.shape[1]), dtype=hidden.dtype)
        self.hidden = _grow_rows(self.hidden, end, 0)
        self.positions = _grow_rows(self.positions, end, 0)
        self.hidden[start:end] = hidden
        self.positions[start:end] = positions
        self.row_of[positions] = mx.arange(start, end, dtype=mx.int32)
        self.size = end

    def grow_positions(self, capacity: int) -> None:
        self.row_of = _grow_rows(self.row_of, capacity, 0, fill=-1)

    def keep_before(self, position: int) -> None:
        _, rows = _rows_before(self.positions, self.size, position)
        if rows is None:
            return
        self.hidden = self.hidden[rows]
        self.positions = self.positions[rows]
        self.size = rows.size
        self.row_of = mx.full(self.row_of.shape, -1, dtype=mx.int32)
        self.row_of[self.positions] = mx.arange(self.size, dtype=mx.int32)

    def waiting(self, stage: StageStore) -> mx.array:
        """Bool mask over rows: tokens still without KV at the stage this aux cache feeds."""
        pos = self.positions[: self.size]
        return stage.index_of[pos] < 0

    def nbytes_waiting(self, stage: StageStore) -> mx.array:
        if self.hidden is None:
            return mx.array(0)
        row_bytes = self.hidden.shape[1] * self.hidden.dtype.size
        return self.waiting(stage).sum() * row_bytes


@dataclass
class LazyCache:
    """Everything LazyLLM keeps between calls: pass it back to continue a conversation."""

    config: LazyConfig
    schedule: Schedule
    stages: list[StageStore] = field(default_factory=list)
    aux: list[AuxStore | None] = field(default_factory=list)  # aux[k] feeds stage k; aux[0] None
    offset: int = 0  # tokens processed so far = the next token's position
    position_capacity: int = 0

    @classmethod
    def empty(cls, config: LazyConfig, schedule: Schedule) -> LazyCache:
        stages = [StageStore(layers) for layers in schedule.stages]
        aux = [None] + [AuxStore() for _ in schedule.boundaries]
        return cls(config=config, schedule=schedule, stages=stages, aux=aux)

    def reserve_positions(self, count: int) -> None:
        needed = self.offset + count
        if needed <= self.position_capacity:
            return
        self.position_capacity = _round_up(needed)
        for store in self.stages:
            store.grow_positions(self.position_capacity)
        for aux in self.aux[1:]:
            aux.grow_positions(self.position_capacity)

    def trim(self, num_tokens: int) -> int:
        """Forget the last `num_tokens` tokens (like mlx-lm's cache.trim); returns how many."""
        num_tokens = max(0, min(num_tokens, self.offset))
        if num_tokens:
            self.offset -= num_tokens
            for store in self.stages:
                store.keep_before(self.offset)
            for aux in self.aux[1:]:
                aux.keep_before(self.offset)
        return num_tokens

    @property
    def state(self) -> list[mx.array]:
        """All arrays, for mx.eval."""
        arrays: list[mx.array] = []
        for store in self.stages:
            arrays += [a for a in store.keys + store.values if a is not None]
            arrays += [store.positions, store.index_of]
        for aux in self.aux[1:]:
            arrays += [aux.positions, aux.row_of] + ([aux.hidden] if aux.hidden is not None else [])
        return arrays

    def kv_bytes(self) -> int:
        return sum(store.nbytes() for store in self.stages)

    def aux_bytes(self) -> int:
        """Bytes of hidden states still waiting in aux caches (revived rows no longer count)."""
        waiting = [aux.nbytes_waiting(stage) for aux, stage in zip(self.aux[1:], self.stages[1:])]
        return int(sum(int(w.item()) for w in waiting))

    def tokens_per_layer(self) -> list[int]:
        """How many tokens hold KV at each layer."""
        return [store.size for store in self.stages for _ in store.layers]
