"""A later boundary's observation window, kept between decode steps: its attention weights over
the stage's stored tokens, so that a step scores the candidates without W new attention rows.

At a boundary after the first the candidates are the stage's stored tokens, and only the
selected ones take part in the softmax. The selection changes from step to step (revival), so the
rows cannot be kept normalised, as the first boundary keeps them. What is kept instead is each
window query's unnormalised weights E = exp(logit - shift) over every entry it sees, one shift
per query and head. A step adds a row for each query that entered the window and a column for
each entry the stage stored (a revived or a new token), then normalises over the selection:

    Z[h, w] = sum_e E[h, w, e] * selected[e],    score[h, e] = mean_w E[h, w, e] / Z[h, w]

which is the masked softmax of pruning.window_probabilities up to rounding: two matrix-vector
products over H·W·N weights, no exponentials and no W·N logits per step.
"""

from __future__ import annotations

import mlx.core as mx

from .pruning import attention_logits
from .stores import ObservedQueries, grow_rows, round_up

# A key added after its row's shift was fixed (a revived token) could in principle exceed it by
# more than float32's exponent range; its weight is capped there (it then dominates the row).
_MAX_EXPONENT = 80.0


class KeptWeights:
    """Weights (H, width, capacity) of the window's queries over a stage's entries, a ring over
    the queries' arrival order (ObservedQueries.added)."""

    def __init__(self, width: int):
        self.width = width
        self.weights: mx.array | None = None
        self.shifts: mx.array | None = None  # (H, width, 1)
        self.rows_added = 0  # queries that arrived before this have rows
        self.entries = 0  # entries before this have columns

    def per_head_scores(
        self,
        window: ObservedQueries,
        keys: mx.array,
        key_pos: mx.array,
        selected: mx.array,
        scale: float,
    ) -> mx.array:
        """The window's attention over the N entries `keys` (1, Hkv, N, D) at positions key_pos,
        normalised over the `selected` ones (N,) bool: per head, averaged over the queries, (H, N).
        Entries are only ever appended to the stage, so earlier columns stay valid."""
        n = keys.shape[2]
        size, heads = window.size, window.queries.shape[1]
        first = window.added - size  # arrival index of the window's oldest query
        stale = (
            self.weights is None
            or self.weights.shape[0] != heads
            or n < self.entries
            or self.rows_added > window.added
        )
        if stale:
            self.weights = mx.zeros((heads, self.width, round_up(n)), dtype=mx.float32)
            self.shifts = mx.zeros((heads, self.width, 1), dtype=mx.float32)
            self.rows_added, self.entries = first, n
        self.weights = grow_rows(self.weights, n, axis=2)
        with_rows = max(0, self.rows_added - first)  # the window's first queries, already kept
        if with_rows and n > self.entries:
            self._add_columns(window, keys, key_pos, scale, first, with_rows)
        if with_rows < size:
            self._add_rows(window, keys, key_pos, scale, first, with_rows)
        self.rows_added, self.entries = window.added, n

        capacity = self.weights.shape[2]
        chosen = mx.pad(selected.astype(mx.float32), (0, capacity - n))[:, None]
        totals = self.weights @ chosen  # (H, width, 1); 0 for a query seeing no selected key
        inverse = mx.where(totals > 0, 1.0 / mx.maximum(totals, 1e-30), 0.0)
        summed = inverse.swapaxes(1, 2) @ self.weights  # (H, 1, capacity)
        return mx.where(selected, summed[:, 0, :n], 0.0) / size

    def _slots(self, begin: int, end: int) -> mx.array:
        return mx.arange(begin, end, dtype=mx.int32) % self.width

    def _add_columns(self, window, keys, key_pos, scale, first: int, count: int) -> None:
        """Columns of the entries stored since the last step, for the queries already kept."""
        e0, n = self.entries, keys.shape[2]
        logits = attention_logits(window.queries[..., :count, :], keys[..., e0:n, :], scale)
        slots = self._slots(first, first + count)
        visible = key_pos[None, e0:n] <= window.positions[:count, None]
        exponent = mx.minimum(logits - self.shifts[:, slots], _MAX_EXPONENT)
        self.weights[:, slots, e0:n] = mx.where(visible, mx.exp(exponent), 0.0)

    def _add_rows(self, window, keys, key_pos, scale, first: int, kept: int) -> None:
        """Rows of the queries that entered the window, over every entry."""
        n, capacity = keys.shape[2], self.weights.shape[2]
        logits = attention_logits(window.queries[..., kept:, :], keys, scale)
        visible = key_pos[None, :] <= window.positions[kept:, None]
        shifts = mx.where(visible, logits, -mx.inf).max(axis=-1, keepdims=True)
        shifts = mx.where(shifts > -mx.inf, shifts, 0.0)
        rows = mx.where(visible, mx.exp(logits - shifts), 0.0)
        slots = self._slots(first + kept, window.added)
        self.weights[:, slots] = mx.pad(rows, [(0, 0), (0, 0), (0, capacity - n)])
        self.shifts[:, slots] = shifts
