"""One rank of the distributed tests, started by `mlx.launch -n 2 --backend ring` (see
test_distributed.py): loads a tiny model folder tensor-sharded (or, with --pipeline, split into
ranges of layers), generates greedily with mlx-lm's sharded generate (tensor parallel) and with
the lazy engine, and writes what it saw to OUT/rank<r>.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lazyllm_mlx  # noqa: F401  (OpenBLAS preload before mlx)
from lazyllm_mlx import make_lazy_cache
from lazyllm_mlx.distributed import count_collectives, load_sharded, world
from lazyllm_mlx.engine import LazyStats, decode_step, prefill
from lazyllm_mlx.generate import generate_step
from lazyllm_mlx.pipeline import split_model
from lazyllm_mlx.runner import runner_for

import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.generate import generation_stream
from mlx_lm.utils import sharded_load
from tiny_models import random_prompt


def held_positions(cache) -> dict[str, list[list[int]]]:
    """Per stage, the positions with KV; per boundary, the positions waiting in the aux cache."""
    stages = [sorted(store.positions[: store.size].tolist()) for store in cache.stages]
    aux = [sorted(a.positions[: a.size].tolist()) for a in cache.aux[1:]]
    return dict(stages=stages, aux=aux)


def lazy_run(model, prompt: mx.array, schedule: str, steps: int) -> dict:
    """Prefill then greedy decode steps through the engine, keeping every step's selections."""
    cache = make_lazy_cache(model, schedule)
    runner = runner_for(model, cache.config)
    stats = LazyStats(runner.family.num_layers)
    with count_collectives() as traffic:
        logits, selections = prefill(runner, cache, prompt, stats)
        mx.eval(logits)
    held, tokens = [held_positions(cache)], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        logits = decode_step(runner, cache, token, stats, selections)
        held.append(held_positions(cache))
    scores = {str(list(s)): n for s, n in traffic.by_shape.items() if len(s) == 1}
    return dict(
        tokens=tokens,
        selections=held,
        revived=stats.revived,
        prefill_fraction=stats.prefill_fraction,
        prefill_collectives=traffic.calls,
        prefill_bytes=traffic.bytes,
        prefill_sent_bytes=traffic.sent_bytes,
        score_reductions=scores,
    )


def run_folder(folder: str, prompt: mx.array, schedules: list[str], steps: int) -> dict:
    """mlx-lm's sharded generate, the engine with nothing pruned, then each schedule."""
    model, _ = load_sharded(folder)
    reference, _ = sharded_load(folder)
    report = dict(
        mlx_lm=[int(t) for t, _ in mlx_generate_step(prompt, reference, max_tokens=steps)]
    )
    # generate_step leaves one step computing ahead on its stream; collectives issued from two
    # streams at once can pair up differently on each rank.
    mx.synchronize(generation_stream)
    report["none"] = [
        int(t) for t, _ in generate_step(prompt, model, lazy="none", max_tokens=steps)
    ]
    mx.synchronize(generation_stream)
    for schedule in schedules:
        report[schedule] = lazy_run(model, prompt, schedule, steps)
    return report


# Pipeline splits of the tiny models' 10 layers: at a boundary of the test schedules (5), and
# inside a stage (3).
PIPELINE_SPLITS = {"even": None, "3+7": [3, 7]}


def run_pipelined(folder: str, prompt: mx.array, schedules: list[str], steps: int) -> dict:
    """Each split: the engine with nothing pruned (what a pipelined baseline runs), then each
    schedule."""
    report = {}
    for name, split in PIPELINE_SPLITS.items():
        model, _ = lazyllm_mlx.load(folder)
        split_model(model, world(), split)
        runs = dict(none=[int(t) for t, _ in generate_step(prompt, model, max_tokens=steps)])
        mx.synchronize(generation_stream)
        for schedule in schedules:
            runs[schedule] = lazy_run(model, prompt, schedule, steps)
        report[name] = runs
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--schedule", action="append", default=[])
    parser.add_argument("--prompt", type=int, default=96)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--pipeline", action="store_true")
    args = parser.parse_args()
    group = world()
    rank = group.rank()
    prompt = random_prompt(args.prompt)
    if args.die_rank is not None:
        model, _ = load_sharded(args.folders[0])
        if args.die_rank == rank:
            print(f"rank {rank}: exiting early on purpose", file=sys.stderr, flush=True)
            return 3
        lazy_run(model, prompt, "paper", args.steps)  # waits on the dead rank's collectives
    report: dict = dict(rank=rank, size=group.size())
    run = run_pipelined if args.pipeline else run_folder
    for folder in args.folders:
        report[Path(folder).name] = run(folder, prompt, args.schedule, args.steps)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
