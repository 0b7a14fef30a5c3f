"""TTFT and bytes communicated per prefill, tensor or pipeline parallel: baseline vs lazy.

Run it under mlx.launch (every rank runs it; rank 0 prints the table and writes the JSON):

    mlx.launch -n 2 --backend ring -- python tools/distributed_bench.py --twin \\
        --out benchmarks/smollm2-135m/distributed_2k.json

SmolLM2-135M's 9 query / 3 KV heads split over 3 processes, not 2: `--twin` runs its shape with
8 / 4 heads (head size 72) and random weights, so 2 ranks can hold it. TTFT depends on how many
tokens each layer computes, which the schedule fixes, not on what the weights rank; the schedule
is SmolLM2's own `default`. Runs are interleaved (baseline, none, lazy, rotating), the median of
--repeats is reported, and the bytes are the payloads this rank puts into collectives.

`--pipeline` splits the real model's layers over the ranks instead (any head count): there the
baseline is the engine with nothing pruned (mlx-lm's model call cannot run one rank's layers),
and `sent` counts the hidden states each rank sends to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lazyllm_mlx  # noqa: F401  (OpenBLAS preload before mlx)
from lazyllm_mlx import distributed
from lazyllm_mlx._mlx_lm_private import model_from_config
from lazyllm_mlx.calibration import CALIBRATED
from lazyllm_mlx.config import LazyConfig
from lazyllm_mlx.evals.measure import generate_once, warm_up
from lazyllm_mlx.generate import default_schedule

import mlx.core as mx
from mlx_lm.generate import generation_stream

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ("llama", 30, 576, 9, 3)


def twin(group: mx.distributed.Group):
    """SmolLM2-135M's shape with 8 / 4 heads and random weights (the same on every rank),
    sharded over `group`, and SmolLM2's tokenizer."""
    from lazyllm_mlx.default_model import default_model_path
    from lazyllm_mlx.gguf.reader import read_header
    from lazyllm_mlx.gguf.tokenizer import build_tokenizer

    config = distributed.source_config(None)
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=72)
    mx.random.seed(0)
    model = model_from_config(config)
    header = read_header(default_model_path())
    return distributed.shard(model, group), build_tokenizer(header.metadata, header.path, None)


def prompt_of(tokenizer, length: int) -> list[int]:
    """`length` tokens of the README's long document, repeated as needed."""
    text = (ROOT / "examples" / "long_document.txt").read_text(encoding="utf-8")
    tokens = tokenizer.encode(text)
    return (tokens * (length // len(tokens) + 1))[:length]


def measure(model, tokenizer, prompt, lazy: LazyConfig | None) -> dict:
    """One request to its first token, and what this rank sent into collectives meanwhile."""
    with distributed.count_collectives() as traffic:
        run = generate_once(model, tokenizer, prompt, lazy, max_tokens=1)
        mx.synchronize(generation_stream)  # nothing left computing ahead of the next run
    scores = sum(n for shape, n in traffic.by_shape.items() if len(shape) == 1)
    stats = run.last.lazy
    return dict(
        ttft=run.last.ttft,
        bytes=traffic.bytes,
        sent_bytes=traffic.sent_bytes,
        collectives=traffic.calls,
        score_reductions=scores,
        prefill_fraction=stats.prefill_fraction if stats else 1.0,
    )


def bench(model, tokenizer, prompt, runs: dict, repeats: int) -> dict:
    warm_up(model, tokenizer, prompt, runs.values())
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(measure(model, tokenizer, prompt, runs[name]))
    return samples


def summary(samples: dict) -> dict:
    out = {}
    for name, runs in samples.items():
        out[name] = dict(runs[0], ttft=statistics.median(r["ttft"] for r in runs))
        out[name]["ttft_all"] = [round(r["ttft"], 3) for r in runs]
    base = out["baseline"]
    for name in out:
        out[name]["ttft_speedup"] = base["ttft"] / out[name]["ttft"]
        out[name]["bytes_vs_baseline"] = out[name]["bytes"] / max(1, base["bytes"])
    return out


def print_table(result: dict) -> None:
    print(f"{result['model']}, {result['ranks']} ranks, {result['prompt_tokens']} tokens")
    print(
        f"{'':<10}{'TTFT s':>9}{'×':>7}{'fraction':>10}{'MB summed':>11}{'MB sent':>9}"
        f"{'calls':>7}{'scores':>8}"
    )
    for name, r in result["runs"].items():
        print(
            f"{name:<10}{r['ttft']:>9.2f}{r['ttft_speedup']:>7.2f}{r['prefill_fraction']:>10.3f}"
            f"{r['bytes'] / 1e6:>11.1f}{r['sent_bytes'] / 1e6:>9.1f}{r['collectives']:>7}"
            f"{r['score_reductions']:>8}"
        )
    print(f"schedule: {result['schedule']}")


def _backend() -> str:
    """The backend mlx.launch started this process with, from the variables it sets."""
    if "MLX_JACCL_COORDINATOR" in os.environ:
        return "jaccl"
    return "ring" if "MLX_HOSTFILE" in os.environ else "mpi"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model to load sharded (default model)")
    parser.add_argument("--twin", action="store_true", help="SmolLM2's shape, 8/4 heads")
    parser.add_argument("--pipeline", action="store_true", help="split the layers, not the heads")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schedule", default=None, help="default: SmolLM2's or the model's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    group = distributed.world()
    if args.twin:
        model, tokenizer = twin(group)
        label = "SmolLM2-135M shape, 8/4 heads, random weights"
    elif args.pipeline:
        model, tokenizer = distributed.load_sharded(args.model, pipeline_group=group)
        label = f"{args.model or 'SmolLM2-135M-Instruct'}, pipeline parallel"
    else:
        model, tokenizer = distributed.load_sharded(args.model, group)
        label = args.model or "SmolLM2-135M-Instruct"
    lazy = LazyConfig.parse(args.schedule or CALIBRATED[SMOLLM2]["default"])
    if args.schedule is None and not args.twin:
        lazy = default_schedule(model)
    prompt = prompt_of(tokenizer, args.tokens)
    runs = {"baseline": None, "none": LazyConfig.preset("none"), "lazy": lazy}
    if args.pipeline:  # its baseline is `none` already
        del runs["none"]
    samples = bench(model, tokenizer, prompt, runs, args.repeats)
    result = dict(
        model=label,
        ranks=group.size(),
        backend=f"{_backend()}, local processes",
        machine="2-core x86-64 Linux CPU, float32, shared with other jobs",
        load_average=os.getloadavg(),
        prompt_tokens=len(prompt),
        schedule=lazy.to_string(),
        repeats=args.repeats,
        command=" ".join(["mlx.launch", "-n", str(group.size()), "--backend", _backend()])
        + " -- python "
        + " ".join(sys.argv),
        when=time.strftime("%Y-%m-%d"),
        runs=summary(samples),
    )
    if group.rank() == 0:
        print_table(result)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
