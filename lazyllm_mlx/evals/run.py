"""Run the eval suite: every method on every prompt, scores, agreement with the baseline, TTFT.

Methods at one prompt length: the baseline (plain mlx-lm), "none" (our engine, nothing pruned: the
engine's own gain or loss), each lazy schedule, and per lazy schedule two references at the same
token budget: random drop (same schedule, tokens drawn at random) and one-shot static pruning (one
boundary, no revival, keep solved so that the prefill computes the same token-layers).

Runs go prompt by prompt, all methods back to back, so a change of machine load between prompts
hits every method alike; the TTFT speed-up is the median over prompts of the per-prompt ratio.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from ..config import LazyConfig, kept_count
from ..families import family_of
from ..generate import for_model
from .baselines import BaselineStore
from .measure import generate_once, warm_up
from .scores import kl_divergence, paired_accuracy_delta, prefix_fraction, score_answer
from .tasks import Task, build_tasks

SOLVED = 0.5  # a prompt the baseline answers right: its score (number, module, code) at least this
FAMILIES = ("baseline", "none", "lazy", "random", "static")


@dataclass(frozen=True)
class Method:
    """One way of running a prompt; `matched_to` names the lazy schedule a reference copies."""

    label: str
    family: str
    lazy: LazyConfig | None
    matched_to: str | None = None

    @property
    def schedule(self) -> str:
        return "off" if self.lazy is None else self.lazy.to_string()


@dataclass
class Outcome:
    """What one generation gave: greedy tokens and text, TTFT, first-token log-probabilities."""

    tokens: list[int]
    text: str
    ttft: float
    logprobs: np.ndarray
    prefill_fraction: float
    reused: bool = False  # a stored baseline outcome (evals.baselines), not a fresh run


def static_config(
    config: LazyConfig, num_layers: int, num_tokens: int, boundary: int | None = None
) -> LazyConfig:
    """One-shot static pruning with the prefill cost of `config` on a `num_tokens` prompt.

    One boundary (default: `config`'s first), no revival; keep is solved so that the prefill
    computes the same token-layers as `config`, to the nearest token kept.
    """
    schedule = config.resolve(num_layers)
    if not schedule.boundaries:
        raise ValueError(f"Schedule {config.to_string()!r} prunes nothing: no static reference.")
    b = schedule.boundaries[0] if boundary is None else boundary
    target = schedule.prefill_fraction(num_tokens) * num_layers * num_tokens
    kept = round((target - b * num_tokens) / (num_layers - b))
    kept = min(num_tokens, max(1, kept))
    keep = kept / num_tokens
    if kept_count(num_tokens, keep) != kept:  # float rounding: nudge onto the wanted count
        keep = (kept - 0.5) / num_tokens
    return LazyConfig(
        boundaries=(b,), keep=(keep,), revive=False, min_prompt_tokens=config.min_prompt_tokens
    )


def build_methods(
    schedules: list[str],
    num_layers: int,
    num_tokens: int,
    references: bool = True,
    include_none: bool = True,
    resolve: Callable[[str], LazyConfig] = LazyConfig.parse,
) -> list[Method]:
    """Baseline first, then "none", the schedules and their references; duplicates dropped.
    resolve: a schedule's text to its config (for a model: its calibrated presets)."""
    methods = [Method("baseline", "baseline", None)]
    if include_none:
        methods.append(Method("none", "none", LazyConfig.preset("none")))
    lazy = [(text, resolve(text)) for text in schedules]
    methods += [Method(text, "lazy", config) for text, config in lazy]
    if references:
        for text, config in lazy:
            if not config.resolve(num_layers).boundaries or config.selection == "random":
                continue
            randomized = replace(config, selection="random", name=None)
            methods.append(Method(f"random[{text}]", "random", randomized, text))
            static = static_config(config, num_layers, num_tokens)
            methods.append(Method(f"static[{text}]", "static", static, text))
    unique: list[Method] = []
    for method in methods:  # the same config twice runs once, under its first label
        if all(method.lazy != other.lazy for other in unique):
            unique.append(method)
    return unique


def run_baseline(
    model: Any, tokenizer: Any, task: Task, method: Method, store: BaselineStore | None
) -> Outcome:
    """The baseline's outcome: from `store` when it holds one, else run (and stored)."""
    stored = store.get(task) if store is not None else None
    if stored is not None:
        return Outcome(prefill_fraction=1.0, reused=True, **stored)
    outcome = run_once(model, tokenizer, task, method)
    if store is not None:
        store.put(task, outcome.tokens, outcome.text, outcome.ttft, outcome.logprobs)
    return outcome


def run_once(model: Any, tokenizer: Any, task: Task, method: Method) -> Outcome:
    run = generate_once(
        model, tokenizer, task.tokens, method.lazy, max_tokens=task.max_tokens, first_logprobs=True
    )
    record = run.record()
    fraction = record["prefill_fraction"]  # None for the baseline, which computes everything
    fraction = 1.0 if fraction is None else fraction
    return Outcome(run.tokens, run.text, record["ttft"], run.first_logprobs, fraction)


def _record(task: Task, outcome: Outcome, base: Outcome) -> dict[str, Any]:
    return dict(
        task=task.task,
        index=task.index,
        score=score_answer(task.scorer, outcome.text, task.answer),
        output=outcome.text,
        ttft=outcome.ttft,
        prefill_fraction=outcome.prefill_fraction,
        first_token=float(outcome.tokens[:1] == base.tokens[:1]),
        kl=kl_divergence(base.logprobs, outcome.logprobs),
        continuation=prefix_fraction(base.tokens, outcome.tokens),
        reused=outcome.reused,
    )


def summarize(method: Method, records: list[dict], base: list[dict], none: list[dict] | None):
    """One method's row at one length: accuracy per task (points), agreement, speed-ups."""
    identity = dict(
        method=method.label,
        family=method.family,
        schedule=method.schedule,
        matched_to=method.matched_to,
    )
    return summarize_records(identity, records, base, none)


def summarize_records(
    identity: dict[str, Any], records: list[dict], base: list[dict], none: list[dict] | None
) -> dict[str, Any]:
    """`summarize` for a method named by its report row's fields (method, family, schedule,
    matched_to), e.g. to merge reports on disjoint prompts (tools/pool_evals.py)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    scores = {
        t: 100 * statistics.fmean(r["score"] for r in records if r["task"] == t) for t in tasks
    }

    def speedup(reference: list[dict]) -> float:
        return statistics.median(b["ttft"] / r["ttft"] for b, r in zip(reference, records))

    delta, delta_se = paired_accuracy_delta(records, base)
    right = [r["first_token"] for r, b in zip(records, base) if b["score"] >= SOLVED]

    return dict(
        **identity,
        scores=scores,
        accuracy=statistics.fmean(scores.values()),
        accuracy_delta=delta,  # vs the baseline on the same prompts, points
        accuracy_delta_se=delta_se,
        first_token=statistics.fmean(r["first_token"] for r in records),
        # where the baseline answers right: a pruned run that disagrees elsewhere may be right
        first_token_where_right=statistics.fmean(right) if right else None,
        kl=statistics.fmean(r["kl"] for r in records),
        continuation=statistics.fmean(r["continuation"] for r in records),
        prefill_fraction=statistics.fmean(r["prefill_fraction"] for r in records),
        ttft_median=statistics.median(r["ttft"] for r in records),
        ttft_speedup=speedup(base),
        ttft_speedup_vs_none=speedup(none) if none is not None else None,
        baselines_reused=sum(bool(b.get("reused")) for b in base),
        instances=list(records),
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    schedules: list[str],
    lengths: list[int],
    tasks: list[str],
    num: int,
    seed: int = 0,
    first_prompt: int = 0,
    max_tokens: int | None = None,
    chat: bool | None = None,
    references: bool = True,
    include_none: bool = True,
    log: Callable[[str], None] | None = _log,
    baselines: BaselineStore | None = None,
    on_prompt: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every method on `num` prompts per task and length; returns the report (JSON-ready).

    baselines: where to reuse and keep the baseline's outcomes (its TTFT then comes from the
    run that stored it, so TTFT ratios against it are not interleaved). on_prompt: called after
    every prompt with the report so far (the prompts done), e.g. to keep a long run's JSON."""
    num_layers = family_of(model).num_layers
    chat = tokenizer.has_chat_template if chat is None else chat
    log = log or (lambda _: None)
    results, warmed = [], False
    for length in lengths:
        prompts = build_tasks(tokenizer, tasks, length, num, seed, chat, first_prompt)
        if max_tokens is not None:
            prompts = [replace(t, max_tokens=max_tokens) for t in prompts]
        methods = build_methods(
            schedules, num_layers, length, references, include_none, partial(for_model, model=model)
        )
        if not warmed:
            warm_up(model, tokenizer, prompts[0].tokens, [m.lazy for m in methods])
            warmed = True
        records: dict[str, list[dict]] = {m.label: [] for m in methods}
        for i, task in enumerate(prompts):
            base = None
            for method in methods:
                if method.family == "baseline":
                    outcome = run_baseline(model, tokenizer, task, method, baselines)
                else:
                    outcome = run_once(model, tokenizer, task, method)
                base = base or outcome  # the baseline runs first
                record = _record(task, outcome, base)
                record.update(task.meta)
                records[method.label].append(record)
                log(
                    f"[{length} {i + 1}/{len(prompts)}] {task.task}#{task.index} "
                    f"{method.label}: score {record['score']:.2f}, TTFT {outcome.ttft:.2f} s, "
                    f"{outcome.text.strip()[:40]!r}"
                )
            if on_prompt is not None and i + 1 < len(prompts):
                done = results + _summaries(length, methods, records)
                on_prompt(_report(num_layers, chat, lengths, tasks, num, seed, first_prompt, done))
        results += _summaries(length, methods, records)
    return _report(num_layers, chat, lengths, tasks, num, seed, first_prompt, results)


def _summaries(length: int, methods: list[Method], records: dict[str, list[dict]]) -> list[dict]:
    none = records.get("none")
    return [
        dict(length=length, **summarize(m, records[m.label], records["baseline"], none))
        for m in methods
    ]


def _report(num_layers, chat, lengths, tasks, num, seed, first, results) -> dict[str, Any]:
    return dict(
        num_layers=num_layers,
        chat_template=chat,
        lengths=lengths,
        tasks=tasks,
        num=num,
        seed=seed,
        first_prompt=first,
        results=results,
    )


def best_schedule(report: dict[str, Any], points: float) -> dict[str, Any] | None:
    """The fastest lazy schedule whose accuracy (mean over lengths) is within `points` of the
    baseline's; speed is the mean over lengths of the median TTFT speed-up. None if none is.
    `se`: the standard error of its accuracy difference to the baseline (paired prompts)."""
    by_method: dict[str, list[dict]] = {}
    for row in report["results"]:
        by_method.setdefault(row["method"], []).append(row)
    baseline = statistics.fmean(r["accuracy"] for r in by_method["baseline"])
    fits = []
    for label, rows in by_method.items():
        if rows[0]["family"] != "lazy":
            continue
        accuracy = statistics.fmean(r["accuracy"] for r in rows)
        speedup = statistics.fmean(r["ttft_speedup"] for r in rows)
        if accuracy >= baseline - points:
            se = math.sqrt(sum(r["accuracy_delta_se"] ** 2 for r in rows)) / len(rows)
            schedule = rows[0]["schedule"]
            fits.append(
                dict(schedule=schedule, label=label, speedup=speedup, accuracy=accuracy, se=se)
            )
    best = max(fits, key=lambda f: f["speedup"], default=None)
    return None if best is None else dict(best, baseline=baseline)
