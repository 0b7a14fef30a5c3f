"""What a stage's attention sees during a lazy call, and how its keys are ranked.

mlx-lm's attention modules get a LayerView as their `cache`: it writes the new keys and values into
the stage's store and fetches the keys the stage attends to; at the layer that ranks tokens its
offset is a Rotations, which hands back the rotated queries for the observation window. Masks are
built by original positions, and the window's queries rank the fetched keys (the window rule, or
the paper's with a window of one).
"""

from __future__ import annotations

import mlx.core as mx

from .distributed import reduce_scores
from .families import Family
from .kept_weights import KeptWeights
from .pruning import combine_heads, pool_by_position, window_probabilities
from .rope import Rotations
from .runner import Runner
from .stage_plan import ChunkPlan, StagePlan
from .stores import StageStore


class LayerView:
    """What an mlx-lm attention sees as `cache` during a lazy call: offsets, KV write and fetch."""

    def __init__(
        self,
        store: StageStore,
        layer: int,
        start: int,
        offset: int | mx.array | Rotations,
        keys_at: mx.array | None,
        key_end: int,
        key_begin: int = 0,
    ):
        self.store, self.layer, self.start = store, layer, start
        # int (contiguous positions) or (L,) positions for the RoPE wrapper, or either inside a
        # Rotations that captures the rotated queries
        self.offset = offset
        self.keys_at = keys_at  # entries to attend to, or None for entries key_begin…key_end
        self.key_begin, self.key_end = key_begin, key_end
        self.fetched_keys: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.store.write(self.layer, self.start, keys, values)
        all_keys, all_values = self.store.keys[self.layer], self.store.values[self.layer]
        if self.keys_at is None:
            base = self.store.base[self.layer]  # a windowed layer's buffers start at its base
            span = slice(self.key_begin - base, self.key_end - base)
            k, v = all_keys[..., span, :], all_values[..., span, :]
        else:
            k = mx.take(all_keys, self.keys_at, axis=2)
            v = mx.take(all_values, self.keys_at, axis=2)
        self.fetched_keys = k
        return k, v


def position_mask(
    query_pos: mx.array,
    key_pos: mx.array,
    window: int | None,
    keys_allowed: mx.array | None,
    causal_suffix: bool,
    single_last: bool,
) -> mx.array | str | None:
    """Attention mask by original positions; the string/None fast paths where they are exact."""
    if window is None and keys_allowed is None:
        if single_last:
            return None
        if causal_suffix:
            return "causal"
    allowed = None if single_last else query_pos[:, None] >= key_pos[None, :]
    if window is not None:
        in_window = query_pos[:, None] < key_pos[None, :] + window
        allowed = in_window if allowed is None else allowed & in_window
    if keys_allowed is not None:
        allowed = keys_allowed[None, :] if allowed is None else allowed & keys_allowed[None, :]
    return allowed


def score_keys(
    runner: Runner, plan: StagePlan, chunk: ChunkPlan, layer: int, view: LayerView
) -> mx.array:
    """Rank the keys `view` fetched (at positions chunk.key_pos) by the observation window's
    attention at `layer`.

    Sliding-window layers are scored without their window: importance over every candidate.
    Unselected keys are masked out of the softmax (head averages depend on the normalisation)
    and rank below every selected key. plan.rows_kept: the keys are every position before
    view.key_end, in order, only ever appended to (the first stage): each query's attention row
    is computed once and kept in the window (a decode step computes one row, not W). A masked
    selection over a later stage's entries (decoding) keeps unnormalised weights instead
    (kept_weights): a step adds the new query's row and the new entries' columns.
    """
    config, window = runner.config, plan.observed
    key_pos, keys_allowed = chunk.key_pos, chunk.keys_allowed
    if config.selection == "random":  # reference method: same counts, no information
        key = mx.random.key(view.key_end * 1009 + layer)
        scores = mx.random.uniform(shape=(view.fetched_keys.shape[2],), key=key)
        return scores if keys_allowed is None else mx.where(keys_allowed, scores, -1.0)
    scale = runner.family.scales[layer]
    if plan.rows_kept:
        end = view.key_end
        n = window.rows_needed(end)
        rows = window_probabilities(
            window.queries[..., window.size - n :, :],
            view.fetched_keys,
            scale,
            window.positions[window.size - n :],
            key_pos,
        )
        summed = window.put_rows(end, rows, plan.capacity)
        scores = combine_heads(summed / min(window.width, end), config.heads)
    elif keys_allowed is not None and view.keys_at is None:  # a decode step's masked selection
        if window.kept is None:
            window.kept = KeptWeights(window.width)
        per_head = window.kept.per_head_scores(
            window, view.fetched_keys, key_pos, keys_allowed, scale
        )
        scores = combine_heads(per_head, config.heads)
    else:
        rows = window_probabilities(
            window.queries, view.fetched_keys, scale, window.positions, key_pos, keys_allowed
        )
        scores = combine_heads(rows.mean(axis=0), config.heads)
    # Tensor parallel: this rank holds a slice of the heads; combine them with the others' first.
    scores = reduce_scores(scores, config.heads, runner.family.layers[layer])
    scores = pool_by_position(scores, key_pos, config.pool, plan.capacity)
    return scores if keys_allowed is None else mx.where(keys_allowed, scores, -1.0)


def observe_queries(
    family: Family, layer: int, rotations: Rotations, plan: StagePlan, chunk: ChunkPlan
) -> None:
    """Keep the rotated queries of the chunk's tokens from plan.observed_from on in the
    observation window."""
    if len(rotations.outputs) != 2:
        raise RuntimeError(
            f"{family.model_type}: expected the attention to apply RoPE to queries then keys "
            f"(2 calls), saw {len(rotations.outputs)}; this family is not supported by the engine."
        )
    tail = chunk.c1 - max(chunk.c0, plan.observed_from)
    plan.observed.extend(chunk.query_pos[-tail:], rotations.outputs[0][..., -tail:, :])
