"""Storage for the lazy cache: the KV of one stage, the aux cache of one boundary, the
observation window of one boundary, and the buffers they grow.

A token enters a stage at its first layer and runs through all of its layers, so every layer of a
stage holds KV for the same tokens in the same order: positions and lookup maps live per stage, key
and value buffers per layer. A token pruned at boundary b keeps its hidden state (the input of layer
b) in the aux cache of that stage until it is revived. Entries are never recomputed: a token has KV
at a stage at most once, which is the "each token at most once per layer" invariant. Buffers grow
by whole steps, so most appends write into room already there.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

STEP = 256
# A sliding-window layer of the first stage also keeps this many entries before its window, so a
# cache can still be trimmed back a little (a server reusing a shared prefix).
TRIM_SLACK = 256


def round_up(n: int) -> int:
    """`n` rounded up to the step buffers grow by (so most appends copy nothing)."""
    return (n + STEP - 1) // STEP * STEP


def grow_rows(buf: mx.array, rows: int, axis: int, fill: int | float = 0) -> mx.array:
    """`buf` extended along `axis` to at least `rows` entries, new entries set to `fill`."""
    have = buf.shape[axis]
    if have >= rows:
        return buf
    shape = list(buf.shape)
    shape[axis] = round_up(rows) - have
    return mx.concatenate([buf, mx.full(shape, fill, dtype=buf.dtype)], axis=axis)


def _rows_before(positions: mx.array, size: int, position: int):
    """(kept positions, their rows) of the entries before `position`; rows None if all are kept."""
    held = np.array(positions[:size])
    kept = np.nonzero(held < position)[0]
    if kept.size == size:
        return held, None
    return held[kept], mx.array(kept.astype(np.int32))


class StageStore:
    """KV for the layers of one stage, the tokens' positions and a position → entry map.

    A layer with `keep_last[j]` set (a sliding-window layer of a contiguous store, read only
    through its window) drops the entries no later query can see, as mlx-lm's rotating cache does:
    its buffers then start at entry `base[j]`.
    """

    def __init__(self, layers: range, keep_last: list[int | None] | None = None):
        self.layers = layers
        self.keys: list[mx.array | None] = [None] * len(layers)
        self.values: list[mx.array | None] = [None] * len(layers)
        self.keep_last = keep_last or [None] * len(layers)
        self.base = [0] * len(layers)  # first entry held in each layer's buffers
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
        self.positions = grow_rows(self.positions, start + count, 0)
        self.positions[start : start + count] = positions
        self.index_of[positions] = mx.arange(start, start + count, dtype=mx.int32)
        self.size += count
        self.sorted = self.sorted and in_order
        return start

    def write(self, layer: int, start: int, keys: mx.array, values: mx.array) -> None:
        """KV of entries start… at `layer` (a windowed layer's first write may start anywhere)."""
        end = start + keys.shape[2]
        keep = self.keep_last[layer]
        if self.keys[layer] is None:
            self.base[layer] = 0 if keep is None else start
        base = self.base[layer]
        # A windowed layer grows only as far as it writes, dropping what is out of reach then.
        rows = (self.size if keep is None else end) - base
        drop = 0
        if keep is not None and self.keys[layer] is not None and self.keys[layer].shape[2] < rows:
            drop = max(0, (start - keep - TRIM_SLACK - base) // STEP * STEP)
        for buffers, new in ((self.keys, keys), (self.values, values)):
            buf = buffers[layer]
            if buf is None:
                buf = mx.zeros((*new.shape[:2], round_up(rows), new.shape[3]), dtype=new.dtype)
            if drop:  # only when growing: the concatenation below copies what is still needed
                buf = buf[..., drop:, :]
            buf = grow_rows(buf, rows - drop, axis=2)
            buf[..., start - base - drop : end - base - drop, :] = new
            buffers[layer] = buf
        self.base[layer] = base + drop

    def held(self, layer: int) -> int:
        """Entries in the layer's buffers (from base[layer] on)."""
        return self.size - self.base[layer]

    def grow_positions(self, capacity: int) -> None:
        self.index_of = grow_rows(self.index_of, capacity, 0, fill=-1)

    def restore(
        self,
        positions: mx.array,
        keys: list[mx.array | None],
        values: list[mx.array | None],
        in_order: bool,
        bases: list[int],
        k: int = 0,
    ) -> None:
        """Hold saved tokens again: their positions, and each layer's KV from entry bases[j]
        (a windowed layer saved only its window). ValueError/KeyError naming stage k when they
        do not fit."""
        count = positions.shape[0]
        contiguous = bool(mx.array_equal(positions, mx.arange(count, dtype=positions.dtype)))
        start = self.append(positions, count, in_order, 0 if contiguous else None)
        if any(bases) and (not contiguous or len(bases) != len(self.layers)):
            raise ValueError(f"stage {k}: window offsets {bases} do not fit the stored tokens")
        for j, (layer_keys, layer_values) in enumerate(zip(keys, values)):
            if layer_keys is None:
                if count:
                    raise KeyError(f"stage{k}.layer{j}.keys")
                continue
            if layer_values is None:
                raise KeyError(f"stage{k}.layer{j}.values")
            if layer_keys.shape[2] != count - bases[j]:
                held = layer_keys.shape[2]
                raise ValueError(f"stage {k} layer {j} holds {held} keys for {count} tokens")
            if bases[j] and self.keep_last[j] is None:
                raise ValueError(f"stage {k} layer {j} is not a window layer but lacks early keys")
            self.write(j, start + bases[j], layer_keys, layer_values)

    def can_keep_before(self, position: int) -> bool:
        """Whether the windowed layers still hold what a query at `position` would read."""
        return all(
            base == 0 or base <= position - keep + 1
            for base, keep in zip(self.base, self.keep_last)
            if keep is not None
        )

    def keep_before(self, position: int) -> None:
        """Forget the tokens at `position` and after (host work: not for the hot path)."""
        if self.contiguous:
            if position < self.size:
                for buffers in (self.keys, self.values):
                    for j, buf in enumerate(buffers):
                        if buf is not None:
                            buffers[j] = buf[..., : max(0, position - self.base[j]), :]
                self.positions = self.positions[:position]
                held = mx.arange(self.index_of.shape[0]) < position
                self.index_of = mx.where(held, self.index_of, -1)
                self.size = position
            return
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
        pairs = [(j, a) for buffers in (self.keys, self.values) for j, a in enumerate(buffers)]
        return sum(a[..., : self.held(j), :].nbytes for j, a in pairs if a is not None)


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
            self.hidden = mx.zeros((round_up(end), hidden.shape[1]), dtype=hidden.dtype)
        self.hidden = grow_rows(self.hidden, end, 0)
        self.positions = grow_rows(self.positions, end, 0)
        self.hidden[start:end] = hidden
        self.positions[start:end] = positions
        self.row_of[positions] = mx.arange(start, end, dtype=mx.int32)
        self.size = end

    def grow_positions(self, capacity: int) -> None:
        self.row_of = grow_rows(self.row_of, capacity, 0, fill=-1)

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


class ObservedQueries:
    """The observation window of one boundary: the rotated queries of the sequence's last
    `width` tokens at the layer that ranks tokens for it. Recent tokens are always kept, so each
    was computed at that layer once, and its query is kept here until it leaves the window.

    For a boundary ranking every token of a contiguous stage (the first), each query's attention
    row over the keys never changes as keys are appended (it sees only keys before it), so the
    rows are kept too: a decode step then computes one new row, not `width` of them. `rows` is a
    ring (width, heads, capacity) indexed by position % width; positions rows_end - width …
    rows_end - 1 hold their rows (earlier ring slots are zero or stale and never read).
    """

    def __init__(self, width: int):
        self.width = width
        self.positions = mx.zeros((0,), dtype=mx.int32)
        self.queries: mx.array | None = None  # (1, H, size, D)
        self.rows: mx.array | None = None
        self.rows_end = 0
        self.added = 0  # queries ever added (arrival order; the window holds the last `size`)
        self.kept = None  # a later boundary's kept_weights.KeptWeights, made by the engine

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    def extend(self, positions: mx.array, queries: mx.array) -> None:
        """Add queries (1, H, n, D) of tokens after every held one; keep the last `width`."""
        self.added += queries.shape[2]
        if self.queries is not None:
            positions = mx.concatenate([self.positions, positions])
            queries = mx.concatenate([self.queries, queries], axis=2)
        self.positions = positions[-self.width :]
        self.queries = queries[..., -self.width :, :]

    def rows_needed(self, end: int) -> int:
        """How many of the window's last queries (the window ending at position `end`) have
        no kept row yet."""
        held = min(self.width, end)
        if self.rows is None or self.rows_end > end:
            return held
        return min(held, end - self.rows_end)

    def put_rows(self, end: int, rows: mx.array, capacity: int) -> mx.array:
        """Keep `rows` (n, H, N) of the queries at end - n … end - 1; returns the window's
        per-head attention summed over its queries, (H, N)."""
        n, heads, count = rows.shape
        if self.rows is None or self.rows_end > end or self.rows.shape[1] != heads:
            self.rows = mx.zeros((self.width, heads, round_up(capacity)), dtype=mx.float32)
        self.rows = grow_rows(self.rows, capacity, axis=2)
        slots = mx.arange(end - n, end, dtype=mx.int32) % self.width
        width = self.rows.shape[2]
        self.rows[slots] = mx.pad(rows, [(0, 0), (0, 0), (0, width - count)])
        self.rows_end = end
        return self.rows[: min(self.width, end)].sum(axis=0)[:, :count]

    def restore(self, positions: mx.array, queries: mx.array, offset: int, k: int = 0) -> None:
        """Hold saved queries again (ValueError naming window k when they do not fit a sequence
        of `offset` tokens)."""
        held = positions.shape[0]
        if queries.ndim != 4 or queries.shape[2] != held or held > self.width:
            raise ValueError(f"observation window {k} holds {held} positions for {queries.shape}")
        if held and not (0 <= positions.min().item() and positions.max().item() < offset):
            raise ValueError(f"observation window {k} holds positions outside 0..{offset - 1}")
        self.extend(positions.astype(mx.int32), queries)

    def forget_rows(self) -> None:
        self.rows, self.rows_end = None, 0

    def keep_before(self, position: int) -> None:
        held = int((self.positions < position).sum().item())
        self.added -= self.size - held
        self.kept = None
        self.positions = self.positions[:held]
        self.queries = None if held == 0 else self.queries[..., :held, :]
        self.forget_rows()
