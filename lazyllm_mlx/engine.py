"""The lazy layer loop: stage-major prefill and decode steps with revival, over mlx-lm's blocks.

One call processes new tokens (a prompt, a later turn, or one decoded token):

  stage 0      every new token, attending to every token (the tokens' original positions);
  boundary k   the last token's attention at the layer before it ranks the tokens the previous stage
               attended to; the top `keep` fraction is selected (the last token always). Selected
               tokens without KV at this stage are computed: new tokens carried over from the
               previous stage, or pruned tokens resumed from this stage's aux cache (revival).
               New tokens not selected wait in the aux cache;
  stage k      the tokens to compute attend to the selected tokens.

A fresh prefill takes a fast path (no lookups: every candidate is a new token in flight, attention
stays plain causal in the compacted order). Decode steps and later turns take the general path.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .boundary import Attend, InFlight, StageResult, prune_fresh, select_and_revive
from .cache import LazyCache
from .families import Family
from .pruning import scoring_layer
from .rope import Recorder
from .stage_attention import LayerView, observe_queries, position_mask, score_keys
from .stats import LazyStats
from .stores import grow_rows


def _run_stage(
    family: Family,
    cache: LazyCache,
    k: int,
    flight: InFlight,
    attend: Attend,
    score: bool,
    step_size: int,
    on_chunk: Callable[[int], None] | None,
) -> StageResult:
    """Compute `flight` through stage k's layers.

    The rotated queries of the sequence's last tokens at the layer that ranks tokens for the next
    boundary go to its observation window; with `score`, that window then ranks the candidates.
    In the final stage only the last token's output is needed: the others only leave KV behind,
    so the last token of a long flight runs as a chunk of its own and the other chunks' outputs
    are never computed (as in mlx-lm's prefill).
    """
    store = cache.stages[k]
    final = k == len(cache.stages) - 1
    observed = None if final else cache.observed[k + 1]
    in_order = flight.first_position is not None or cache.offset == 0 or flight.count == 1
    start = store.append(flight.positions, flight.count, in_order, flight.first_position)
    keys_at = store.index_of[attend.selected] if attend.gather else None
    masked = attend.selected is not None and not attend.gather
    # Entry = position: a sliding-window layer reads only the keys inside its window, as mlx-lm's
    # rotating cache does (not the scoring layer: importance covers every candidate).
    window_slices = store.contiguous and attend.selected is None
    scorer = scoring_layer(store.layers, family.windows)
    rows_kept = k == 0 and store.contiguous and attend.selected is None
    # The new tokens are the flight's last ones; the window observes the last of them.
    observed_from = flight.count - min(cache.config.window, flight.new_count)
    outputs, scores = [], None
    split_last = final and flight.count > _SPLIT_MIN_TOKENS
    for c0, c1 in _chunks(flight.count, step_size, split_last):
        if flight.hidden.ndim == 1:  # embed chunk by chunk, as mlx-lm's prefill does
            x = family.embed(flight.hidden[None, c0:c1])
        else:
            x = flight.hidden[:, c0:c1]
        query_pos = flight.positions[c0:c1]
        last_chunk = c1 == flight.count
        if flight.first_position is not None:
            offset = flight.first_position + c0
        else:
            offset = query_pos
        key_end = start + c1
        key_pos = attend.selected if attend.gather else store.positions[:key_end]
        keys_allowed = attend.is_selected[key_pos] if masked else None
        causal_suffix = attend.selected is None and store.sorted
        single_last = c1 - c0 == 1 and last_chunk
        observing = observed is not None and c1 > observed_from
        masks = {}
        for j, layer_index in enumerate(store.layers):
            at_scorer = layer_index == scorer
            scoring = score and last_chunk and at_scorer
            window = family.windows[layer_index]
            begin = 0
            if window is not None and window_slices and not scoring:
                begin = max(0, start + c0 - window + 1)
            if (window, begin) not in masks:
                masks[window, begin] = position_mask(
                    query_pos, key_pos[begin:], window, keys_allowed, causal_suffix, single_last
                )
            view = LayerView(store, j, start + c0, offset, keys_at, key_end, begin)
            rope = family.ropes[layer_index]
            rope.recorder = Recorder() if observing and at_scorer else None
            x = family.layers[layer_index](x, masks[window, begin], cache=view)
            if on_chunk is None:
                # Decoding: each layer's output goes to the device as soon as its graph is
                # built, so the host builds the next layer while the device computes it.
                # Revival's host sync at every boundary stops mlx-lm's one-step-ahead
                # pipelining; this keeps host and device overlapped within a step.
                mx.async_eval(x)
            if rope.recorder is not None:
                tail = c1 - max(c0, observed_from)
                observe_queries(family, layer_index, rope.recorder, observed, query_pos, tail)
                rope.recorder = None
            if scoring:
                scores = score_keys(
                    family, cache, layer_index, view, observed, key_pos, keys_allowed, rows_kept
                )
        needed = not final or last_chunk
        if needed:
            outputs.append(x)
        if on_chunk is not None:  # prefill: evaluate chunk by chunk to bound the graph and memory
            buffers = [b for b in store.keys + store.values if b is not None]
            if observed is not None and observed.queries is not None:
                buffers.append(observed.queries)
            mx.eval(*buffers, *([x] if needed else []))
            on_chunk((c1 - c0) * len(store.layers))
    hidden = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
    if attend.gather:
        return StageResult(hidden, scores, attend.selected, attend.count)
    n_candidates = attend.count if masked else store.size
    return StageResult(hidden, scores, store.positions[: store.size], n_candidates)


# A separate last chunk reads every weight of the stage once more; that pays only when it saves
# the last layer's attention and MLP for enough other tokens (revived tokens while decoding do not).
_SPLIT_MIN_TOKENS = 64


def _chunks(count: int, step: int, split_last: bool) -> list[tuple[int, int]]:
    end = count - 1 if split_last and count > 1 else count
    bounds = [(c0, min(end, c0 + step)) for c0 in range(0, end, step)]
    return bounds + ([(end, count)] if end < count else [])


def lazy_forward(
    family: Family,
    cache: LazyCache,
    tokens: mx.array,
    stats: LazyStats,
    *,
    prune: bool,
    decoding: bool,
    step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Process `tokens` (1-D) at positions cache.offset…; returns the last token's logits (1, V).

    prune=False computes every new token at every layer against whatever KV each layer holds (used
    for "none", short prompts, and decoding without revival).
    """
    count = tokens.shape[0]
    first = cache.offset
    cache.reserve_positions(count)
    fresh = first == 0
    positions = mx.arange(first, first + count, dtype=mx.int32)
    flight = InFlight(positions, tokens, count, first, count)
    selecting = prune and bool(cache.schedule.boundaries)
    counts = _planned_counts(cache, count, selecting)
    planned = sum(n * len(s.layers) for n, s in zip(counts, cache.stages))
    done = 0

    def on_chunk(token_layers: int) -> None:
        nonlocal done
        done += token_layers
        if progress is not None:
            progress(min(count - 1, count * done // max(1, planned)), count)

    attend, ranked = Attend(), None
    end = first + count
    last_stage = len(cache.stages) - 1
    reuse = decoding and selecting and decode_step_keeps_selection(cache)
    held = []
    for k in range(len(cache.stages)):
        if k > 0 and selecting:
            if reuse:
                attend = _held_selection(cache, k, flight)
            elif fresh:
                flight = prune_fresh(cache, k, flight, ranked.scores, end)
                attend = Attend()  # the stage stores exactly the selected tokens
            else:
                flight, attend = select_and_revive(cache, k, flight, ranked, end, stats, decoding)
            held.append(attend)
        ranked = _run_stage(
            family,
            cache,
            k,
            flight,
            attend,
            score=selecting and k < last_stage and not reuse,
            step_size=step_size,
            on_chunk=on_chunk if not decoding else None,
        )
        flight.hidden = ranked.hidden
        layers = len(cache.stages[k].layers)
        if decoding:
            stats.decode_token_layers += flight.count * layers
        else:
            stats.prefill_token_layers += flight.new_count * layers
            stats.revival_token_layers += (flight.count - flight.new_count) * layers
            _add_per_layer(stats.prefill_tokens_per_layer, k, cache, flight.new_count)
    cache.offset += count
    cache.held_selections = held
    cache.steps_without_selection = cache.steps_without_selection + 1 if reuse else 0
    if decoding:
        stats.decode_steps += 1
    else:
        stats.prompt_tokens += count
        stats.pruned = stats.pruned or selecting
    return family.head(flight.hidden[:, -1:, :])[:, -1, :]


def decode_step_keeps_selection(cache: LazyCache) -> bool:
    """Whether this decode step keeps the boundaries' last selections (config.reselect_every)."""
    every = cache.config.reselect_every
    held = len(cache.held_selections) == len(cache.stages) - 1
    return held and cache.steps_without_selection < every - 1


def _held_selection(cache: LazyCache, k: int, flight: InFlight) -> Attend:
    """Boundary k's last selection with the step's new tokens (all in flight) added."""
    attend = cache.held_selections[k - 1]
    if attend.selected is None:  # the stage stores exactly the selection
        return attend
    if attend.is_selected.shape[0] < cache.position_capacity:
        attend.is_selected = grow_rows(attend.is_selected, cache.position_capacity, 0, False)
    attend.is_selected[flight.positions] = True
    attend.count += flight.count
    attend.gather = False  # a decode step's few queries attend through a mask
    return attend


def _planned_counts(cache: LazyCache, count: int, selecting: bool) -> list[int]:
    if selecting:
        return cache.schedule.present_counts(count)
    return [count] * len(cache.stages)


def _add_per_layer(per_layer: list[int], k: int, cache: LazyCache, amount: int) -> None:
    if not per_layer:
        per_layer.extend([0] * cache.schedule.num_layers)
    for layer in cache.stages[k].layers:
        per_layer[layer] += amount
