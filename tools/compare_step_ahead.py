"""What one-step-ahead decoding buys on the steps that keep their selections (`every=N`).

    python tools/compare_step_ahead.py --tokens 4096 --schedule default --max-tokens 64 --pairs 3

In one process, interleaved, after a warm-up: the baseline (mlx-lm), the schedule as `generate_step`
runs it (steps that keep their selections are built before the current token is handed out, as
mlx-lm does), and the same schedule with every decode step built after its token is handed out
(the order steps that select must keep, since they wait on the host). The two lazy runs must give
the same tokens; the table gives decode speed over the first 16 tokens and overall, and the median
time between tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx import generate_step, load
from lazyllm_mlx.evals.sources import real_text_tokens
from lazyllm_mlx.lazy_steps import RequestSteps
from lazyllm_mlx.output_files import write_json

import mlx.core as mx

_AHEAD = RequestSteps.ahead


def _after_each_token(steps) -> bool:
    """Every selecting step after its token is handed out (steps that keep their selection too)."""
    return not steps.selections.selecting


def timed_run(model, prompt: mx.array, lazy, max_tokens: int, ahead: bool) -> dict:
    RequestSteps.ahead = _AHEAD if ahead else _after_each_token
    try:
        start = time.perf_counter()
        stamps, tokens = [], []
        for token, _ in generate_step(prompt, model, lazy=lazy, max_tokens=max_tokens):
            stamps.append(time.perf_counter())
            tokens.append(token)
    finally:
        RequestSteps.ahead = _AHEAD
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    first = min(16, len(stamps)) - 1
    return {
        "ttft": stamps[0] - start,
        "decode_tps_16": first / (stamps[first] - stamps[0]),
        "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "median_step_ms": 1000 * statistics.median(gaps),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (real text)")
    parser.add_argument("--schedule", default="default", help="a schedule with every=N")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3, help="measured rounds of the three runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.max_tokens < 17:
        parser.error("--max-tokens must be at least 17 (decode over the first 16 tokens)")
    model, tokenizer = load(args.model) if args.model else load()
    prompt = mx.array(real_text_tokens(tokenizer, args.tokens), dtype=mx.int32)
    methods = {"baseline": (None, True), "ahead": (args.schedule, True)}
    methods["after the token"] = (args.schedule, False)
    timed_run(model, prompt, args.schedule, args.max_tokens, ahead=True)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in range(args.pairs):
        for name, (lazy, ahead) in methods.items():
            runs[name].append(timed_run(model, prompt, lazy, args.max_tokens, ahead))
    if runs["ahead"][0]["tokens"] != runs["after the token"][0]["tokens"]:
        raise SystemExit("error: the two lazy orders gave different tokens")
    keys = ("decode_tps_16", "decode_tps", "median_step_ms")
    medians = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    print(f"\n{args.tokens} tokens, {args.schedule!r}, {args.max_tokens} generated, medians of "
          f"{args.pairs} interleaved runs")  # fmt: skip
    print(f"{'':16} {'decode 16 tok/s':>15} {'decode tok/s':>12} {'step ms':>8}")
    for name, row in medians.items():
        print(f"{name:16} {row[keys[0]]:15.2f} {row[keys[1]]:12.2f} {row[keys[2]]:8.1f}")
    if args.json:
        report = {"command": vars(args), "medians": medians}
        report["runs"] = {n: [{k: r[k] for k in keys} for r in rs] for n, rs in runs.items()}
        write_json(args.json, report, indent=1)


if __name__ == "__main__":
    main()
