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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import LazyCache, ObservedQueries, StageStore, _grow_rows
from .config import boundary_count
from .families import Family
from .kept_weights import KeptWeights
from .pruning import (
    always_kept,
    combine_heads,
    pool_by_position,
    scoring_layer,
    select_top,
    split_top,
    window_probabilities,
)
from .rope import Recorder

# Decoding: each layer's output goes to the device as soon as its graph is built, so the host
# builds the next layer while the device computes it. Revival's host sync at every boundary stops
# mlx-lm's one-step-ahead pipelining; this keeps host and device overlapped within a step.
_EVAL_EACH_LAYER = True
_FAR = 1 << 30  # added to positions to sort "not wanted" entries last


@dataclass
class LazyStats:
    """Counters of one request (prefill + decode), for stats and for the invariant tests."""

    num_layers: int
    prompt_tokens: int = 0
    prefill_token_layers: int = 0  # this request's prompt tokens, computed during its prefill
    revival_token_layers: int = 0  # older tokens revived while prefilling a later turn
    decode_token_layers: int = 0
    decode_steps: int = 0
    revived: int = 0  # tokens resumed from an aux cache
    pruned: bool = False  # whether this request pruned anything
    prefill_tokens_per_layer: list[int] = field(default_factory=list)
    aux_bytes: int = 0

    @property
    def prefill_fraction(self) -> float:
        """Prompt token-layers computed in prefill / (prompt tokens × layers)."""
        return self.prefill_token_layers / max(1, self.prompt_tokens * self.num_layers)

    @property
    def ideal_prefill_speedup(self) -> float:
        return 1.0 / self.prefill_fraction if self.prefill_token_layers else 1.0


@dataclass
class _InFlight:
    """Tokens computed at the current stage in this call: positions and hidden states."""

    positions: mx.array  # (n,) int32, increasing
    hidden: mx.array  # (1, n, hidden), or (n,) token ids before the first stage embeds them
    count: int
    first_position: int | None  # set when positions are contiguous (plain RoPE offset)
    new_count: int  # how many of them are this call's new tokens (the others are revived)


@dataclass
class _Attend:
    """Which stored keys the tokens of a stage attend to.

    selected None: everything the store holds. Otherwise the selected positions, reached either by
    gathering their keys (many queries: fewer keys to score) or by masking the whole store (a few
    queries, as in decoding: no copies of the keys).
    """

    selected: mx.array | None = None  # positions
    count: int = 0  # how many are selected
    is_selected: mx.array | None = None  # bool per position
    gather: bool = False


class LayerView:
    """What an mlx-lm attention sees as `cache` during a lazy call: offsets, KV write and fetch."""

    def __init__(
        self, store: StageStore, layer: int, start: int, offset, keys_at, key_end: int, key_begin=0
    ):
        self.store, self.layer, self.start = store, layer, start
        self.offset = offset  # int (contiguous positions) or (L,) positions for the RoPE wrapper
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


def _mask(query_pos, key_pos, window, keys_allowed, causal_suffix: bool, single_last: bool):
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


def _score(
    family: Family,
    cache: LazyCache,
    layer: int,
    view: LayerView,
    window: ObservedQueries,
    key_pos: mx.array,
    keys_allowed: mx.array | None,
    rows_kept: bool,
) -> mx.array:
    """Rank the keys `view` fetched (at positions key_pos) by the observation window's attention.

    Sliding-window layers are scored without their window: importance over every candidate.
    Unselected keys are masked out of the softmax (head averages depend on the normalisation)
    and rank below every selected key. rows_kept: the keys are every position before
    view.key_end, in order, only ever appended to (the first stage): each query's attention row
    is computed once and kept in the window (a decode step computes one row, not W). A masked
    selection over a later stage's entries (decoding) keeps unnormalised weights instead
    (kept_weights): a step adds the new query's row and the new entries' columns.
    """
    config = cache.config
    if config.selection == "random":  # reference method: same counts, no information
        key = mx.random.key(view.key_end * 1009 + layer)
        scores = mx.random.uniform(shape=(view.fetched_keys.shape[2],), key=key)
        return scores if keys_allowed is None else mx.where(keys_allowed, scores, -1.0)
    scale = family.scales[layer]
    if rows_kept:
        end = view.key_end
        n = window.rows_needed(end)
        rows = window_probabilities(
            window.queries[..., window.size - n :, :],
            view.fetched_keys,
            scale,
            window.positions[window.size - n :],
            key_pos,
        )
        summed = window.put_rows(end, rows, cache.position_capacity)
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
    scores = pool_by_position(scores, key_pos, config.pool, cache.position_capacity)
    return scores if keys_allowed is None else mx.where(keys_allowed, scores, -1.0)


def _observe(
    family: Family, layer: int, recorder: Recorder, window: ObservedQueries, positions, tail: int
) -> None:
    """Keep the rotated queries of the chunk's last `tail` tokens in the observation window."""
    if len(recorder.outputs) != 2:
        raise RuntimeError(
            f"{family.model_type}: expected the attention to apply RoPE to queries then keys "
            f"(2 calls), saw {len(recorder.outputs)}; this family is not supported by the engine."
        )
    window.extend(positions[-tail:], recorder.outputs[0][..., -tail:, :])


@dataclass
class _StageResult:
    """What a stage hands to the next boundary: its tokens' outputs and the ranking."""

    hidden: mx.array  # (1, n, hidden): the flight's outputs (the final stage: the last token's)
    scores: mx.array | None  # the observation window's scores over the candidates
    candidates: mx.array  # positions the scores rank
    n_candidates: int  # how many of them are candidates (the others are masked out)


def _run_stage(
    family: Family,
    cache: LazyCache,
    k: int,
    flight: _InFlight,
    attend: _Attend,
    score: bool,
    step_size: int,
    on_chunk: Callable[[int], None] | None,
) -> _StageResult:
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
                masks[window, begin] = _mask(
                    query_pos, key_pos[begin:], window, keys_allowed, causal_suffix, single_last
                )
            view = LayerView(store, j, start + c0, offset, keys_at, key_end, begin)
            rope = family.ropes[layer_index]
            rope.recorder = Recorder() if observing and at_scorer else None
            x = family.layers[layer_index](x, masks[window, begin], cache=view)
            if _EVAL_EACH_LAYER and on_chunk is None:
                mx.async_eval(x)
            if rope.recorder is not None:
                tail = c1 - max(c0, observed_from)
                _observe(family, layer_index, rope.recorder, observed, query_pos, tail)
                rope.recorder = None
            if scoring:
                scores = _score(
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
        return _StageResult(hidden, scores, attend.selected, attend.count)
    n_candidates = attend.count if masked else store.size
    return _StageResult(hidden, scores, store.positions[: store.size], n_candidates)


# A separate last chunk reads every weight of the stage once more; that pays only when it saves
# the last layer's attention and MLP for enough other tokens (revived tokens while decoding do not).
_SPLIT_MIN_TOKENS = 64


def _chunks(count: int, step: int, split_last: bool) -> list[tuple[int, int]]:
    end = count - 1 if split_last and count > 1 else count
    bounds = [(c0, min(end, c0 + step)) for c0 in range(0, end, step)]
    return bounds + ([(end, count)] if end < count else [])


def _boundary_count(cache: LazyCache, k: int, n_candidates: int, end: int) -> int:
    schedule = cache.schedule
    return boundary_count(n_candidates, schedule.keep[k - 1], schedule.forced_count(end))


def _always_kept(cache: LazyCache, positions: mx.array, end: int) -> mx.array:
    return always_kept(positions, cache.schedule.sink, cache.schedule.recent, end)


def _prune_fresh(
    cache: LazyCache, k: int, flight: _InFlight, scores: mx.array, end: int
) -> _InFlight:
    """Boundary of a fresh prefill: every candidate is in flight, in the order of the scores."""
    count = _boundary_count(cache, k, flight.count, end)
    kept, dropped = split_top(scores, count, _always_kept(cache, flight.positions, end))
    if dropped.size:
        cache.aux[k].append(flight.positions[dropped], flight.hidden[0, dropped])
    return _InFlight(flight.positions[kept], flight.hidden[:, kept], count, None, count)


# Up to this many tokens computed at a stage attend through a mask over the whole store; more
# (later turns of a conversation) gather the selected keys, which scores fewer of them.
_MASK_MAX_QUERIES = 64


def _not_revived(
    cache: LazyCache,
    scores: mx.array,
    candidates: mx.array,
    count: int,
    forced: mx.array,
    selected: mx.array,
    selected_scores: mx.array,
    from_aux: mx.array,
    end: int,
    decoding: bool,
) -> mx.array:
    """Bool per selected token: wanted back from the aux cache but ranked below the config's
    revive_top share of the selection, or (decoding) beyond its revive_cap best-scoring returns, so
    it stays pruned this time (all False with neither). A prefill chunk brings back all it wants:
    there the returns ride along with the chunk's own tokens."""
    top, cap = cache.config.revive_top, cache.config.revive_cap
    skipped = mx.zeros(selected.shape, dtype=mx.bool_)
    if top < 1.0:
        n_top = max(math.ceil(top * count), min(count, cache.schedule.forced_count(end)))
        eligible = mx.zeros((cache.position_capacity,), dtype=mx.bool_)
        eligible[candidates[select_top(scores, n_top, forced)]] = True
        skipped = from_aux & ~eligible[selected]
    if decoding and cap is not None and cap < selected.shape[0]:
        wanted = from_aux & ~skipped
        within = mx.zeros(selected.shape, dtype=mx.bool_)
        if cap:
            best = mx.argpartition(-mx.where(wanted, selected_scores, -mx.inf), kth=cap - 1)
            within[best[:cap]] = True
        skipped = skipped | (wanted & ~within)
    return skipped


def _select_and_revive(
    cache: LazyCache,
    k: int,
    flight: _InFlight,
    ranked: _StageResult,
    end: int,
    stats: LazyStats,
    decoding: bool,
) -> tuple[_InFlight, _Attend]:
    """Boundary in the general case: select among what stage k-1 ranked, then gather what
    stage k must compute."""
    store, aux = cache.stages[k], cache.aux[k]
    count = _boundary_count(cache, k, ranked.n_candidates, end)
    # Masked-out candidates score -1 and the always-kept tokens are among the candidates.
    candidates = ranked.candidates
    forced = _always_kept(cache, candidates, end)
    scores = ranked.scores
    if cache.config.revive_margin:  # what is computed at this stage holds its place
        held = store.index_of[candidates] >= 0
        scores = mx.where(held, scores * (1.0 + cache.config.revive_margin), scores)
    chosen = select_top(scores, count, forced)
    selected = candidates[chosen]

    in_flight_row = mx.full((cache.position_capacity,), -1, dtype=mx.int32)
    in_flight_row[flight.positions] = mx.arange(flight.count, dtype=mx.int32)
    missing = store.index_of[selected] < 0
    from_aux = missing & (in_flight_row[selected] < 0)
    skipped = _not_revived(
        cache, scores, candidates, count, forced, selected, scores[chosen], from_aux, end, decoding
    )
    is_selected = mx.zeros((cache.position_capacity,), dtype=mx.bool_)
    is_selected[selected] = ~skipped
    missing, from_aux = missing & ~skipped, from_aux & ~skipped

    left_behind = ~is_selected[flight.positions]
    new = missing & (selected >= cache.offset)
    n_missing, n_from_aux, n_left, n_new, n_skipped = mx.stack(
        [missing.sum(), from_aux.sum(), left_behind.sum(), new.sum(), skipped.sum()]
    ).tolist()  # the one host sync of a boundary: the shapes below depend on these counts

    if n_left:
        order = mx.arange(flight.count, dtype=mx.int32)
        rows = mx.sort(mx.where(left_behind, order, order + _FAR))[:n_left]
        aux.append(flight.positions[rows], flight.hidden[0, rows])
    todo = mx.sort(mx.where(missing, selected, selected + _FAR))[:n_missing]
    if n_skipped:
        count -= n_skipped
        selected = mx.sort(mx.where(skipped, selected + _FAR, selected))[:count]
    rows_in_flight = in_flight_row[todo]
    hidden = flight.hidden[0, mx.maximum(rows_in_flight, 0)]
    if n_from_aux:
        revived = aux.hidden[mx.maximum(aux.row_of[todo], 0)]
        hidden = mx.where((rows_in_flight >= 0)[:, None], hidden, revived)
        stats.revived += n_from_aux
    gather = n_missing > _MASK_MAX_QUERIES
    attend = _Attend(mx.sort(selected) if gather else selected, count, is_selected, gather)
    return _InFlight(todo, hidden[None], n_missing, None, n_new), attend


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
    flight = _InFlight(positions, tokens, count, first, count)
    selecting = prune and bool(cache.schedule.boundaries)
    counts = _planned_counts(cache, count, selecting)
    planned = sum(n * len(s.layers) for n, s in zip(counts, cache.stages))
    done = 0

    def on_chunk(token_layers: int) -> None:
        nonlocal done
        done += token_layers
        if progress is not None:
            progress(min(count - 1, count * done // max(1, planned)), count)

    attend, ranked = _Attend(), None
    end = first + count
    last_stage = len(cache.stages) - 1
    reuse = decoding and selecting and decode_step_keeps_selection(cache)
    held = []
    for k in range(len(cache.stages)):
        if k > 0 and selecting:
            if reuse:
                attend = _held_selection(cache, k, flight)
            elif fresh:
                flight = _prune_fresh(cache, k, flight, ranked.scores, end)
                attend = _Attend()  # the stage stores exactly the selected tokens
            else:
                flight, attend = _select_and_revive(cache, k, flight, ranked, end, stats, decoding)
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


def _held_selection(cache: LazyCache, k: int, flight: _InFlight) -> _Attend:
    """Boundary k's last selection with the step's new tokens (all in flight) added."""
    attend = cache.held_selections[k - 1]
    if attend.selected is None:  # the stage stores exactly the selection
        return attend
    if attend.is_selected.shape[0] < cache.position_capacity:
        attend.is_selected = _grow_rows(attend.is_selected, cache.position_capacity, 0, False)
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
