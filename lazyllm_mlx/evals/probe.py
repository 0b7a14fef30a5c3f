"""Where a model's attention finds what a prompt asks for: the layer to cut at, measured cheaply.

For each needle prompt of the eval suite (passkey, kv, mdqa: the answer sits in a known span), one
plain forward pass records every full-attention layer's queries and keys; each layer then ranks
the prompt's tokens with a ranking rule (observation window, pooling, head reduction, sinks) and
the probe asks whether the answer's tokens are among the top `keep` fraction. A schedule's first
stage computes every token, exactly as this pass does, so the recall at layer b - 1 is exactly
what a first boundary at layer b keeps. No decoding: a prompt costs one baseline prefill, so a
model is probed in minutes where `eval --search` takes hours.

Small models find the answer only at a few layers (SmolLM2-135M from layer 17 of 30, Gemma 3 270M
at its first global layer, 5 of 18; BENCHMARKS.md): the earliest layer that finds it bounds how
early a schedule can cut without losing answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..config import LazyConfig
from ..families import family_of
from ..pruning import combine_heads, pool_by_position, window_probabilities
from ..rope import capturing
from .tasks import Task, build_tasks

PROBE_TASKS = ("passkey", "kv", "mdqa")  # tasks whose answer is a span of the prompt


def answer_positions(tokenizer: Any, task: Task) -> list[list[int]]:
    """Token positions of each occurrence of the answer inside the task's inserted span."""
    begin, end = task.meta["answer_span"]
    pieces = [tokenizer.decode([t]) for t in task.tokens[begin:end]]
    text = "".join(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces])
    found, at = [], text.find(task.answer)
    while at >= 0:
        stop = at + len(task.answer)
        found.append(
            [begin + i for i in range(len(pieces)) if starts[i] < stop and starts[i + 1] > at]
        )
        at = text.find(task.answer, at + 1)
    return found


def layer_scores(
    model: Any, tokens: list[int], rules: list[LazyConfig], step_size: int = 2048
) -> list[dict[int, mx.array]]:
    """Per rule, each full-attention layer's ranking of the prompt's tokens, (N,), from one plain
    (chunked) forward pass of mlx-lm's model."""
    family = family_of(model)
    full = [i for i, w in enumerate(family.windows) if w is None]  # window layers never rank
    n = len(tokens)
    width = min(max(rule.window for rule in rules), n)
    keys: dict[int, list[mx.array]] = {i: [] for i in full}
    queries: dict[int, mx.array | None] = {i: None for i in full}
    cache = make_prompt_cache(model)
    for c0 in range(0, n, step_size):
        with capturing([family.ropes[i] for i in full]) as captured:
            model(mx.array(tokens[c0 : c0 + step_size])[None], cache=cache)
        for i, (q, k) in zip(full, (outputs[:2] for outputs in captured)):
            keys[i].append(k)
            held = q if queries[i] is None else mx.concatenate([queries[i], q], axis=2)
            queries[i] = held[..., -width:, :]
        mx.eval(*(k[-1] for k in keys.values()), *queries.values())
    positions = mx.arange(n, dtype=mx.int32)
    scores: list[dict[int, mx.array]] = [{} for _ in rules]
    for i in full:
        all_keys = mx.concatenate(keys[i], axis=2)
        rows = window_probabilities(
            queries[i], all_keys, family.scales[i], positions[-width:], positions
        )
        for r, rule in enumerate(rules):
            w = min(rule.window, n)
            s = combine_heads(rows[-w:].mean(axis=0), rule.heads)
            scores[r][i] = pool_by_position(s, positions, rule.pool, n)
        mx.eval(*(by_layer[i] for by_layer in scores))
    return scores


def recall_at(scores: mx.array, occurrences: list[list[int]], keep: float, rule: LazyConfig):
    """The best occurrence's fraction of answer tokens among the `keep` top-ranked (the sinks and
    the last `window`/`recent` tokens always count as kept, as in the engine)."""
    n = scores.shape[0]
    s = np.array(scores, dtype=np.float64)
    recent = max(1, rule.window, rule.recent)
    s[max(0, n - recent) :] = np.inf
    s[: rule.sink] = np.inf
    count = min(n, max(math.ceil(round(keep * n, 6)), rule.sink + recent))
    kept = set(np.argpartition(-s, count - 1)[:count].tolist())
    return max(float(np.mean([p in kept for p in occ])) for occ in occurrences)


def probe(
    model: Any,
    tokenizer: Any,
    rules: list[LazyConfig],
    *,
    length: int,
    num: int,
    keeps: list[float],
    seed: int = 0,
    chat: bool | None = None,
    tasks: tuple[str, ...] = PROBE_TASKS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Recall of the answer tokens per rule, scoring layer and keep fraction, per task
    (JSON-ready); the rules share each prompt's forward pass."""
    chat = tokenizer.has_chat_template if chat is None else chat
    per: dict[tuple[int, int, float, str], list[float]] = {}
    for i, task in enumerate(build_tasks(tokenizer, tasks, length, num, seed, chat)):
        occurrences = answer_positions(tokenizer, task)
        if not occurrences:  # the tokenizer merged the answer with its neighbours
            continue
        for r, by_layer in enumerate(layer_scores(model, task.tokens, rules)):
            for layer, s in by_layer.items():
                for keep in keeps:
                    recall = recall_at(s, occurrences, keep, rules[r])
                    per.setdefault((r, layer, keep, task.task), []).append(recall)
        if log is not None:
            log(f"[probe {length} {i + 1}/{num * len(tasks)}] {task.task}#{task.index}")
    rows = []
    for r, rule in enumerate(rules):
        for keep in keeps:
            for layer in sorted({key[1] for key in per}):
                recall = {
                    t: float(np.mean(per[r, layer, keep, t]))
                    for t in tasks
                    if (r, layer, keep, t) in per
                }
                mean = float(np.mean([*recall.values()]))
                rows.append(dict(rule=rule_options(rule), layer=layer, keep=keep, recall=recall,
                                 mean=mean))  # fmt: skip
    return dict(
        length=length,
        num=num,
        seed=seed,
        rules=[rule_options(rule) for rule in rules],
        keeps=keeps,
        tasks=list(tasks),
        num_layers=family_of(model).num_layers,
        rows=rows,
    )


def rule_options(rule: LazyConfig) -> str:
    """The ranking rule as schedule options (`w=64;pool=13;...`), to append to boundaries."""
    return rule.to_string().removeprefix("none").lstrip(";")


def suggest(report: dict[str, Any], target: float, rule: str | None = None) -> dict | None:
    """The cheapest single cut whose mean recall reaches `target` (with `rule`, default the
    report's first): boundary after the scoring layer, at the smallest keep that reaches it
    there; None if no layer does."""
    rule = report["rules"][0] if rule is None else rule
    layers = report["num_layers"]
    best = None
    for row in report["rows"]:
        if row["rule"] != rule or row["mean"] < target or row["layer"] + 1 >= layers:
            continue
        boundary = row["layer"] + 1
        fraction = (boundary + (layers - boundary) * row["keep"]) / layers
        if best is None or fraction < best["prefill_fraction"]:
            best = dict(boundary=boundary, keep=row["keep"], recall=row["mean"], rule=rule)
            best["prefill_fraction"] = fraction
            best["schedule"] = f"{boundary}:{row['keep']:g}" + (f";{rule}" if rule else "")
    return best
