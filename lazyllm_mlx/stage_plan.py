"""How one engine call runs one stage, decided before its first layer (`StagePlan`), and what
each chunk of the stage's tokens sees (`ChunkPlan`): which keys, which mask fast paths hold,
where the observation window is fed, whether the last token runs as a chunk of its own.

The layer loop (engine.py) reads these plans; it derives nothing from the cache's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .cache import LazyCache
from .flight import Attend, InFlight
from .stores import ObservedQueries, StageStore

# A separate last chunk reads every weight of the stage once more; that pays only when it saves
# the last layer's attention and MLP for enough other tokens (revived tokens while decoding do not).
SPLIT_MIN_TOKENS = 64


@dataclass
class StagePlan:
    """Stage k of one call: its store, what its tokens attend to, how it ranks and is chunked."""

    k: int
    store: StageStore
    start: int  # the store entry of the flight's first token
    attend: Attend
    keys_at: mx.array | None  # entries a gathered selection attends to (None: a span)
    masked: bool  # a selection reached through a mask over the whole store
    window_slices: bool  # sliding-window layers read only the keys inside their window
    causal_suffix: bool  # keys in position order, all attended: the "causal" mask holds
    scorer: int  # the layer whose attention ranks tokens for the next boundary
    ranks: bool  # whether this call ranks there (the last chunk at the scorer)
    observed: ObservedQueries | None  # the next boundary's window (None in the final stage)
    observed_from: int  # the flight's first token whose query the window keeps
    rows_kept: bool  # the window keeps its attention rows (keys only ever appended, in order)
    final: bool  # only the last token's output is needed
    embeds: bool  # the flight holds token ids, embedded chunk by chunk (the first stage)
    evaluates_chunks: bool  # a prefill evaluates each chunk; a decode step each layer, async
    chunks: list[tuple[int, int]]
    capacity: int  # positions the cache has room for (lookup and pooling sizes)


@dataclass
class ChunkPlan:
    """The flight's tokens c0…c1 - 1 in one stage: their positions and the keys they see."""

    c0: int
    c1: int
    query_pos: mx.array
    offset: int | mx.array  # the RoPE offset: an int for contiguous positions
    key_end: int  # the store entries before this hold the keys of a span
    key_pos: mx.array  # positions of the keys the attention fetches
    keys_allowed: mx.array | None  # bool per key: a masked selection
    single_last: bool  # the sequence's last token alone: no mask needed
    observing: bool  # the window keeps some of these tokens' queries
    last: bool


def plan_stage(
    cache: LazyCache,
    k: int,
    flight: InFlight,
    attend: Attend,
    *,
    scorer: int,
    ranks: bool,
    step_size: int,
    prefill: bool,
) -> StagePlan:
    """Reserve the flight's entries in stage k's store and plan the stage: `scorer` is its
    scoring layer, `ranks` whether this call ranks there, `step_size` the most queries a chunk
    holds, `prefill` whether the call prefills (else it decodes)."""
    store = cache.stages[k]
    final = k == len(cache.stages) - 1
    in_order = flight.first_position is not None or cache.offset == 0 or flight.count == 1
    start = store.append(flight.positions, flight.count, in_order, flight.first_position)
    observed = None if final else cache.observed[k + 1]
    unselected = attend.selected is None
    return StagePlan(
        k=k,
        store=store,
        start=start,
        attend=attend,
        keys_at=store.index_of[attend.selected] if attend.gather else None,
        masked=not unselected and not attend.gather,
        # Entry = position: a sliding-window layer reads only the keys inside its window, as
        # mlx-lm's rotating cache does (not the scoring layer: importance covers every candidate).
        window_slices=store.contiguous and unselected,
        causal_suffix=unselected and store.sorted,
        scorer=scorer,
        ranks=ranks,
        observed=observed,
        # The new tokens are the flight's last ones; the window observes the last of them.
        observed_from=flight.count - min(observed.width if observed else 1, flight.new_count),
        rows_kept=k == 0 and store.contiguous and unselected,
        final=final,
        embeds=k == 0,
        evaluates_chunks=prefill,
        chunks=_chunks(flight.count, step_size, final and flight.count > SPLIT_MIN_TOKENS),
        capacity=cache.position_capacity,
    )


def plan_chunk(plan: StagePlan, flight: InFlight, c0: int, c1: int) -> ChunkPlan:
    """The keys and mask fast paths of the flight's tokens c0…c1 - 1."""
    query_pos = flight.positions[c0:c1]
    first = flight.first_position
    key_end = plan.start + c1
    attend = plan.attend
    key_pos = attend.selected if attend.gather else plan.store.positions[:key_end]
    last = c1 == flight.count
    return ChunkPlan(
        c0=c0,
        c1=c1,
        query_pos=query_pos,
        offset=first + c0 if first is not None else query_pos,
        key_end=key_end,
        key_pos=key_pos,
        keys_allowed=attend.is_selected[key_pos] if plan.masked else None,
        single_last=c1 - c0 == 1 and last,
        observing=plan.observed is not None and c1 > plan.observed_from,
        last=last,
    )


def _chunks(count: int, step: int, split_last: bool) -> list[tuple[int, int]]:
    end = count - 1 if split_last and count > 1 else count
    bounds = [(c0, min(end, c0 + step)) for c0 in range(0, end, step)]
    return bounds + ([(end, count)] if end < count else [])
