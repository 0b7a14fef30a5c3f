"""Prefill time of a long prompt on a random model shaped like SmolLM2-135M: baseline vs lazy.

    python tools/bench_random_prefill.py --tokens 2000 --runs 3

Baseline is plain mlx-lm (its generate_step), the rest is the lazy engine; each is warmed up
once, then the median of --runs time-to-first-token measurements is reported with the ratio to the
baseline and the prefill fraction. Writes the table as JSON with --json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx import LazyConfig, generate_step
from lazyllm_mlx._platform import default_dtype
from lazyllm_mlx.output_files import write_json

import mlx.core as mx
from mlx_lm.models import llama

SMOLLM2_135M = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def time_to_first_token(model, prompt, lazy, step_size) -> tuple[float, float | None]:
    stats = lazyllm_mlx.LazyStats(len(model.layers)) if lazy is not None else None
    extra = {"stats": stats} if stats is not None else {}
    start = time.perf_counter()
    steps = generate_step(
        prompt, model, lazy=lazy, max_tokens=1, prefill_step_size=step_size, **extra
    )
    next(steps)
    elapsed = time.perf_counter() - start
    steps.close()
    return elapsed, (stats.prefill_fraction if stats is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--schedules", default="none,paper")
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    dtype = default_dtype()
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, SMOLLM2_135M["vocab_size"], (args.tokens,))

    rows = []
    for name in ["baseline", *args.schedules.split(",")]:
        lazy = None if name == "baseline" else LazyConfig.parse(name)
        time_to_first_token(model, prompt, lazy, args.prefill_step_size)  # warm-up
        times, fraction = [], None
        for _ in range(args.runs):
            elapsed, fraction = time_to_first_token(model, prompt, lazy, args.prefill_step_size)
            times.append(elapsed)
        rows.append(dict(schedule=name, ttft=statistics.median(times), prefill_fraction=fraction))
    base = rows[0]["ttft"]
    print(
        f"random SmolLM2-135M-shaped model, {args.tokens} tokens, {mx.default_device()}, "
        f"median of {args.runs}"
    )
    print(f"{'schedule':<24}{'TTFT s':>9}{'vs base':>9}{'prefill frac':>14}{'ideal':>8}")
    for row in rows:
        row["speedup"] = base / row["ttft"]
        frac = row["prefill_fraction"]
        ideal = f"×{1 / frac:.2f}" if frac else ""
        frac_text = f"{frac:.3f}" if frac else "-"
        print(
            f"{row['schedule']:<24}{row['ttft']:>9.3f}{'×' + format(row['speedup'], '.2f'):>9}"
            f"{frac_text:>14}{ideal:>8}"
        )
    if args.json:
        write_json(args.json, dict(tokens=args.tokens, runs=args.runs, rows=rows), indent=2)


if __name__ == "__main__":
    main()
