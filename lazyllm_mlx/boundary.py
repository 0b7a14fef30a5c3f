"""A boundary between two stages: which tokens go on, which wait in the aux cache, and which
pruned tokens are revived from it.

A fresh prefill's boundary only splits the tokens in flight (prune_fresh). Decode steps and later
turns select among every token the previous stage attended to (select_and_revive): selected tokens
this stage has not computed are gathered, from the flight or from the aux cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from .cache import LazyCache
from .config import boundary_count
from .flight import Attend, InFlight, StageResult
from .pruning import always_kept, select_top, split_top
from .runner import Runner
from .stats import LazyStats
from .stores import StageStore

_FAR = 1 << 30  # added to positions to sort "not wanted" entries last


def _boundary_count(runner: Runner, k: int, n_candidates: int, end: int) -> int:
    schedule = runner.schedule
    return boundary_count(n_candidates, schedule.keep[k - 1], schedule.forced_count(end))


def _always_kept(runner: Runner, positions: mx.array, end: int) -> mx.array:
    return always_kept(positions, runner.schedule.sink, runner.schedule.recent, end)


def prune_fresh(
    runner: Runner, cache: LazyCache, k: int, flight: InFlight, scores: mx.array, end: int
) -> InFlight:
    """Boundary of a fresh prefill: every candidate is in flight, in the order of the scores."""
    count = _boundary_count(runner, k, flight.count, end)
    kept, dropped = split_top(scores, count, _always_kept(runner, flight.positions, end))
    if dropped.size:
        cache.aux[k].append(flight.positions[dropped], flight.hidden[0, dropped])
    return InFlight(flight.positions[kept], flight.hidden[:, kept], count, None, count)


# Up to this many tokens computed at a stage attend through a mask over the whole store; more
# (later turns of a conversation) gather the selected keys, which scores fewer of them.
MASK_MAX_QUERIES = 64


@dataclass
class _Choice:
    """What a boundary's ranking chose among the candidates (positions): `count` of them,
    always with the `forced` ones, by `scores` (with revive_margin applied)."""

    candidates: mx.array
    scores: mx.array
    forced: mx.array
    count: int
    chosen: mx.array  # indices into candidates, increasing

    @property
    def selected(self) -> mx.array:
        return self.candidates[self.chosen]


def _choose(runner: Runner, store: StageStore, k: int, ranked: StageResult, end: int) -> _Choice:
    count = _boundary_count(runner, k, ranked.n_candidates, end)
    # Masked-out candidates score -1 and the always-kept tokens are among the candidates.
    candidates = ranked.candidates
    forced = _always_kept(runner, candidates, end)
    scores = ranked.scores
    margin = runner.config.revive_margin
    if margin:  # what is computed at this stage holds its place
        held = store.index_of[candidates] >= 0
        scores = mx.where(held, scores * (1.0 + margin), scores)
    return _Choice(candidates, scores, forced, count, select_top(scores, count, forced))


def _not_revived(
    runner: Runner, choice: _Choice, from_aux: mx.array, end: int, capacity: int, decoding: bool
) -> mx.array:
    """Bool per selected token: wanted back from the aux cache but ranked below the config's
    revive_top share of the selection, or (decoding) beyond its revive_cap best-scoring returns, so
    it stays pruned this time (all False with neither). A prefill chunk brings back all it wants:
    there the returns ride along with the chunk's own tokens."""
    top, cap = runner.config.revive_top, runner.config.revive_cap
    selected, count = choice.selected, choice.count
    skipped = mx.zeros(selected.shape, dtype=mx.bool_)
    if top < 1.0:
        n_top = max(math.ceil(top * count), min(count, runner.schedule.forced_count(end)))
        eligible = mx.zeros((capacity,), dtype=mx.bool_)
        eligible[choice.candidates[select_top(choice.scores, n_top, choice.forced)]] = True
        skipped = from_aux & ~eligible[selected]
    if decoding and cap is not None and cap < selected.shape[0]:
        wanted = from_aux & ~skipped
        within = mx.zeros(selected.shape, dtype=mx.bool_)
        if cap:
            selected_scores = choice.scores[choice.chosen]
            best = mx.argpartition(-mx.where(wanted, selected_scores, -mx.inf), kth=cap - 1)
            within[best[:cap]] = True
        skipped = skipped | (wanted & ~within)
    return skipped


def select_and_revive(
    runner: Runner,
    cache: LazyCache,
    k: int,
    flight: InFlight,
    ranked: StageResult,
    end: int,
    stats: LazyStats,
    decoding: bool,
) -> tuple[InFlight, Attend]:
    """Boundary in the general case: select among what stage k-1 ranked, then gather what
    stage k must compute."""
    store, aux = cache.stages[k], cache.aux[k]
    choice = _choose(runner, store, k, ranked, end)
    selected, count = choice.selected, choice.count
    in_flight_row = mx.full((cache.position_capacity,), -1, dtype=mx.int32)
    in_flight_row[flight.positions] = mx.arange(flight.count, dtype=mx.int32)
    missing = store.index_of[selected] < 0
    from_aux = missing & (in_flight_row[selected] < 0)
    skipped = _not_revived(runner, choice, from_aux, end, cache.position_capacity, decoding)
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
    gather = n_missing > MASK_MAX_QUERIES
    attend = Attend(mx.sort(selected) if gather else selected, count, is_selected, gather)
    return InFlight(todo, hidden[None], n_missing, None, n_new), attend
