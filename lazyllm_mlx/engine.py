"""The lazy layer loop over mlx-lm's blocks: `prefill` for a prompt (or a later turn's new tokens)
and `decode_step` for each generated token.

Each call takes the Runner (the model's family and the schedule: the policy), the LazyCache
(storage, written in place) and the request's stats; a decode step also takes the request's
Selections. Stage by stage:

  stage 0      every new token, attending to every token (the tokens' original positions);
  boundary k   the last tokens' attention at the stage's scoring layer ranks the tokens the
               previous stage attended to; the top `keep` fraction is selected (the last token
               always). Selected tokens without KV at this stage are computed: new tokens
               carried over from the previous stage, or pruned tokens resumed from this stage's
               aux cache (revival). New tokens not selected wait in the aux cache;
  stage k      the tokens to compute attend to the selected tokens.

A fresh prefill's boundaries only split the tokens in flight (no lookups: attention stays plain
causal in the compacted order); later turns and decode steps select among everything stored. A
decode step may keep the boundaries' last selections (config.reselect_every). Each stage is
planned once (stage_plan) and its layers run chunk by chunk; a prefill evaluates each chunk (a
bounded graph, progress), a decode step hands each layer to the device as soon as it is built.
The active Instrument (instrument.py) sees every call, boundary and stage.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx

from .boundary import prune_fresh, select_and_revive
from .cache import LazyCache
from .flight import Attend, InFlight, StageResult
from .instrument import active
from .rope import Rotations
from .runner import Runner, Selections
from .stage_attention import LayerView, observe_queries, position_mask, score_keys
from .stage_plan import ChunkPlan, StagePlan, plan_chunk, plan_stage
from .stats import LazyStats
from .stores import grow_rows

OnChunk = Callable[[int], None]  # told the token-layers each prefill chunk computed


def prefill(
    runner: Runner,
    cache: LazyCache,
    tokens: mx.array,
    stats: LazyStats,
    *,
    step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[mx.array, Selections]:
    """Process `tokens` (1-D) at positions cache.offset…; returns the last token's logits (1, V)
    and the request's Selections for its decode steps. A context shorter than the schedule's
    min_prompt_tokens is computed whole (every token at every layer)."""
    count = tokens.shape[0]
    end = cache.offset + count
    selecting = runner.prunes(end)
    on_chunk = _progress(runner, count, selecting, progress)

    def run() -> tuple[mx.array, list[Attend]]:
        flight, ranked, attend, held = _enter(cache, tokens), None, Attend(), []
        for k, layers in enumerate(runner.schedule.stages):
            if k > 0 and selecting:
                select = partial(_prefill_boundary, runner, cache, k, flight, ranked, end, stats)
                flight, attend = active().boundary(k, ranked, select)
                held.append(attend)
            ranks = selecting and k < len(runner.scorers) - 1
            plan = plan_stage(
                cache, k, flight, attend, scorer=runner.scorers[k], ranks=ranks,
                step_size=step_size, prefill=True,
            )  # fmt: skip
            ranked = active().stage(
                plan, flight, partial(_run_stage, runner, plan, flight, on_chunk)
            )
            flight.hidden = ranked.hidden
            stats.prefill_token_layers += flight.new_count * len(layers)
            stats.revival_token_layers += (flight.count - flight.new_count) * len(layers)
            _add_per_layer(stats.prefill_tokens_per_layer, layers, runner, flight.new_count)
        cache.offset += count
        return _logits(runner, flight), held

    logits, held = active().call("prefill", cache, count, run)
    stats.prompt_tokens += count
    stats.pruned = stats.pruned or selecting
    return logits, Selections(selecting and runner.config.revive, held)


def _prefill_boundary(
    runner: Runner,
    cache: LazyCache,
    k: int,
    flight: InFlight,
    ranked: StageResult,
    end: int,
    stats: LazyStats,
) -> tuple[InFlight, Attend]:
    if cache.empty():  # a fresh prefill: the stage stores exactly the selected tokens
        return prune_fresh(runner, cache, k, flight, ranked.scores, end), Attend()
    return select_and_revive(runner, cache, k, flight, ranked, end, stats, False)


def decode_step(
    runner: Runner,
    cache: LazyCache,
    tokens: mx.array,
    stats: LazyStats,
    selections: Selections,
    step_size: int = 2048,
) -> mx.array:
    """Process generated `tokens` (1-D, usually one) at positions cache.offset…; returns the
    last one's logits (1, V). Selects at the boundaries when selections.selecting, afresh or
    keeping the last selections (config.reselect_every); updates `selections`."""
    count = tokens.shape[0]
    end = cache.offset + count
    reuse = selections.kept_by_next_step(runner)

    def run() -> tuple[mx.array, list[Attend]]:
        flight, ranked, attend, held = _enter(cache, tokens), None, Attend(), []
        for k, layers in enumerate(runner.schedule.stages):
            if k > 0 and selections.selecting:
                if reuse:
                    attend = _held_selection(selections.held[k - 1], cache, flight)
                else:
                    select = partial(
                        select_and_revive, runner, cache, k, flight, ranked, end, stats, True
                    )
                    flight, attend = active().boundary(k, ranked, select)
                held.append(attend)
            ranks = selections.selecting and k < len(runner.scorers) - 1 and not reuse
            plan = plan_stage(
                cache, k, flight, attend, scorer=runner.scorers[k], ranks=ranks,
                step_size=step_size, prefill=False,
            )  # fmt: skip
            ranked = active().stage(plan, flight, partial(_run_stage, runner, plan, flight, None))
            flight.hidden = ranked.hidden
            stats.decode_token_layers += flight.count * len(layers)
        cache.offset += count
        return _logits(runner, flight), held

    logits, selections.held = active().call("decode", cache, count, run)
    selections.steps_without_selection = selections.steps_without_selection + 1 if reuse else 0
    stats.decode_steps += 1
    return logits


def _logits(runner: Runner, flight: InFlight) -> mx.array:
    """The last token's logits (1, V), on every rank of a pipeline."""
    last = flight.hidden[:, -1:, :]
    pipeline = runner.family.pipeline
    if pipeline is not None:
        last = pipeline.from_owner(last, pipeline.num_layers - 1)
    return runner.family.head(last)[:, -1, :]


def _enter(cache: LazyCache, tokens: mx.array) -> InFlight:
    """The call's new tokens, as ids at their positions, before the first stage."""
    count, first = tokens.shape[0], cache.offset
    cache.reserve_positions(count)
    positions = mx.arange(first, first + count, dtype=mx.int32)
    return InFlight(positions, tokens, count, first, count)


def _run_stage(
    runner: Runner, plan: StagePlan, flight: InFlight, on_chunk: OnChunk | None
) -> StageResult:
    """Compute `flight` through the stage's layers, chunk by chunk (see StagePlan). In the final
    stage only the last token's output is needed: the others only leave KV behind."""
    outputs, scores = [], None
    for c0, c1 in plan.chunks:
        chunk = plan_chunk(plan, flight, c0, c1)
        if plan.embeds:  # embed chunk by chunk, as mlx-lm's prefill does
            x = runner.family.embed(flight.hidden[None, c0:c1])
        else:
            x = flight.hidden[:, c0:c1]
        x, ranked = _run_layers(runner, plan, chunk, x)
        scores = ranked if ranked is not None else scores
        needed = not plan.final or chunk.last
        if needed:
            outputs.append(x)
        if plan.evaluates_chunks:  # bound the graph and memory; tell the progress
            buffers = [b for b in plan.store.keys + plan.store.values if b is not None]
            if plan.observed is not None and plan.observed.queries is not None:
                buffers.append(plan.observed.queries)
            mx.eval(*buffers, *([x] if needed else []))
            on_chunk((c1 - c0) * len(plan.store.layers))
    hidden = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
    attend = plan.attend
    if attend.gather:
        return StageResult(hidden, scores, attend.selected, attend.count)
    n_candidates = attend.count if plan.masked else plan.store.size
    return StageResult(hidden, scores, plan.store.positions[: plan.store.size], n_candidates)


def _run_layers(
    runner: Runner, plan: StagePlan, chunk: ChunkPlan, x: mx.array
) -> tuple[mx.array, mx.array | None]:
    """One chunk through the stage's layers; returns its output and, where the chunk ranks
    the candidates, their scores."""
    family, masks, scores = runner.family, {}, None
    pipeline = family.pipeline
    for j, layer in enumerate(plan.store.layers):
        at_scorer = layer == plan.scorer
        scoring = plan.ranks and chunk.last and at_scorer
        if pipeline is not None:
            x = pipeline.enter(layer, x)
            if not pipeline.owns(layer):  # another rank computes it; the scores come from there
                if scoring:
                    empty = mx.zeros(chunk.key_pos.shape, mx.float32)
                    scores = pipeline.from_owner(empty, layer)
                continue
        window = family.windows[layer]
        begin = 0
        if window is not None and plan.window_slices and not scoring:
            begin = max(0, plan.start + chunk.c0 - window + 1)
        if (window, begin) not in masks:
            masks[window, begin] = position_mask(
                chunk.query_pos, chunk.key_pos[begin:], window, chunk.keys_allowed,
                plan.causal_suffix, chunk.single_last,
            )  # fmt: skip
        observing = chunk.observing and at_scorer
        offset = Rotations(chunk.offset) if observing else chunk.offset
        start = plan.start + chunk.c0
        view = LayerView(plan.store, j, start, offset, plan.keys_at, chunk.key_end, begin)
        x = family.layers[layer](x, masks[window, begin], cache=view)
        if not plan.evaluates_chunks:
            # A decode step hands each layer to the device as soon as its graph is built, so
            # the host builds the next layer while the device computes it (revival's host sync
            # at every boundary stops mlx-lm's one-step-ahead pipelining).
            mx.async_eval(x)
        if observing:
            observe_queries(family, layer, offset, plan, chunk)
        if scoring:
            scores = score_keys(runner, plan, chunk, layer, view)
            if pipeline is not None:
                scores = pipeline.from_owner(scores.astype(mx.float32), layer)
    return x, scores


def _progress(
    runner: Runner, count: int, selecting: bool, progress: Callable[[int, int], None] | None
) -> OnChunk:
    """Turns the token-layers each chunk computed into prompt progress (count - 1 at most:
    the caller reports the end)."""
    if selecting:
        counts = runner.schedule.present_counts(count)
    else:
        counts = [count] * len(runner.schedule.stages)
    planned = sum(n * len(s) for n, s in zip(counts, runner.schedule.stages))
    done = 0

    def on_chunk(token_layers: int) -> None:
        nonlocal done
        done += token_layers
        if progress is not None:
            progress(min(count - 1, count * done // max(1, planned)), count)

    return on_chunk


def _held_selection(attend: Attend, cache: LazyCache, flight: InFlight) -> Attend:
    """A boundary's last selection with the step's new tokens (all in flight) added."""
    if attend.selected is None:  # the stage stores exactly the selection
        return attend
    if attend.is_selected.shape[0] < cache.position_capacity:
        attend.is_selected = grow_rows(attend.is_selected, cache.position_capacity, 0, False)
    attend.is_selected[flight.positions] = True
    attend.count += flight.count
    attend.gather = False  # a decode step's few queries attend through a mask
    return attend


def _add_per_layer(per_layer: list[int], layers: range, runner: Runner, amount: int) -> None:
    if not per_layer:
        per_layer.extend([0] * runner.schedule.num_layers)
    for layer in layers:
        per_layer[layer] += amount
