"""Where decoding time goes with revival: step times against the token-layers each step computes.

    python tools/profile_decode.py --tokens 2048 --schedule default --max-tokens 64

Runs plain mlx-lm, the schedule with revival and the schedule with `;norevive` on the same
real-text prompt, timing every decode step (warm-up run first). Revival makes a step compute the
pruned tokens the new token selects, at the layers where they lack KV: "deferred" token-layers.
The report fits  step time = norevive step time + cost × deferred token-layers  and compares that
cost with the prefill's cost per token-layer, then shows the decode speed over the first n tokens
(revival front-loads the deferred work, so the ratio to the baseline grows with n). Last, a
breakdown of the steps by stage: each stage and each boundary's selection evaluated on its own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx import LazyStats, generate_step, load
from lazyllm_mlx.evals.sources import real_text_tokens
from lazyllm_mlx.generate import for_model
from lazyllm_mlx.instrument import Instrument, instrumented
from lazyllm_mlx.output_files import write_json

import mlx.core as mx


def timed_steps(model, prompt, lazy, max_tokens: int) -> tuple[float, list[float], list[int]]:
    """TTFT, then the seconds and computed token-layers of every decode step."""
    stats = LazyStats(len(model.layers)) if lazy is not None else None
    extra = {"stats": stats} if stats is not None else {}
    start = time.perf_counter()
    times, layers, previous, last, ttft = [], [], 0, start, 0.0
    for n, _ in enumerate(generate_step(prompt, model, lazy=lazy, max_tokens=max_tokens, **extra)):
        now = time.perf_counter()
        done = stats.decode_token_layers if stats is not None else 0
        if n == 0:  # mlx-lm's order builds the next step before a token is handed out
            ttft, previous = now - start, done
        else:
            times.append(now - last)
            layers.append(done - previous)
            previous = done
        last = now
    return ttft, times, layers


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def by_deferred(deferred: list[int], times: list[float]) -> list[tuple[str, int, float, float]]:
    """Revival steps grouped by their deferred token-layers: (range, steps, median s, median d)."""
    rows = []
    for low, high in ((0, 10), (11, 20), (21, 50), (51, 100), (101, None)):
        top = high if high is not None else max(deferred, default=0)
        group = [(t, d) for t, d in zip(times, deferred) if low <= d <= top]
        if group:
            label = f"{low}-{high}" if high is not None else f">{low - 1}"
            median_time = statistics.median(t for t, _ in group)
            rows.append((label, len(group), median_time, statistics.median(d for _, d in group)))
    return rows


def median_seconds(fn, *inputs, repeats: int) -> float:
    """Median wall time of `fn(*inputs)` (which evaluates its result), after one warm-up call."""
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_row_costs(model, rows=(1, 2, 4, 8, 16), repeats: int = 50) -> dict[int, float]:
    """Median seconds of one decoder layer on `rows` tokens (no cache): what one more token in a
    decode step costs per layer, before any attention over the context."""
    layer, hidden = model.layers[0], model.args.hidden_size

    def run(x, mask):
        mx.eval(layer(x, mask))

    costs = {}
    for n in rows:
        x = mx.random.normal((1, n, hidden), key=mx.random.key(n))
        costs[n] = median_seconds(run, x, None if n == 1 else "causal", repeats=repeats)
    return costs


def attention_row_costs(
    model, context: int, rows=(1, 2, 4, 8, 16), repeats: int = 50
) -> dict[int, tuple[float, float]]:
    """Median seconds of the attention of `rows` queries over `context` keys (the fused kernel
    with a boolean mask, as revival decoding calls it) and of the softmax of its scores alone."""
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    keys = mx.random.normal((1, kv_heads, context, dim), key=mx.random.key(0))
    values = mx.random.normal((1, kv_heads, context, dim), key=mx.random.key(1))

    def attend(queries, mask):
        mx.eval(mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask))

    costs = {}
    for n in rows:
        queries = mx.random.normal((1, heads, n, dim), key=mx.random.key(n))
        mask = mx.random.uniform(shape=(n, context), key=mx.random.key(n + 1)) < 0.7
        scores = mx.random.normal((1, heads, n, context), key=mx.random.key(n + 2))
        mx.eval(keys, values, queries, mask, scores)
        costs[n] = (
            median_seconds(attend, queries, None if n == 1 else mask, repeats=repeats),
            median_seconds(lambda x: mx.eval(mx.softmax(x, axis=-1)), scores, repeats=repeats),
        )
    return costs


class StageTimes(Instrument):
    """Per engine call, per stage: (layers, tokens computed, seconds, seconds of the selection
    before it). Each part is evaluated before the next starts."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[range, int, float, float]]] = []
        self.selection = 0.0

    def boundary(self, k, ranked, run):
        mx.eval(ranked.hidden, *([ranked.scores] if ranked.scores is not None else []))
        start = time.perf_counter()  # the previous stage's work is not the selection's
        out = run()
        mx.eval(out[0].hidden)
        self.selection = time.perf_counter() - start
        return out

    def stage(self, plan, flight, run):
        start = time.perf_counter()
        out = run()
        mx.eval(*(x for x in (out.hidden, out.scores) if x is not None))
        if plan.k == 0:
            self.calls.append([])
        seconds = time.perf_counter() - start
        self.calls[-1].append((plan.store.layers, flight.count, seconds, self.selection))
        self.selection = 0.0
        return out


def stage_breakdown(model, prompt, lazy, max_tokens: int) -> list[dict[str, float]]:
    """Per stage of the decode steps (the first one, the prefill's deferred bulk, left out):
    median tokens computed, ms to compute them, and ms of the selection before the stage. Each
    part is evaluated before the next starts, so the parts add up to more than a real step."""
    with instrumented(StageTimes()) as timings:
        timed_steps(model, prompt, lazy, max_tokens)
    calls = timings.calls
    decode = calls[2:]  # after the prefill and the first decode step
    rows = []
    for k, (layers, *_) in enumerate(decode[0]):
        mine = [call[k] for call in decode]
        rows.append(
            {
                "stage": k,
                "layers": len(layers),
                "tokens": statistics.median(p[1] for p in mine),
                "stage_ms": statistics.median(p[2] for p in mine) * 1e3,
                "selection_ms": statistics.median(p[3] for p in mine) * 1e3,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--schedule", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", help="write the per-step figures here")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    prompt = mx.array(real_text_tokens(tokenizer, args.tokens))
    num_layers = len(model.layers)
    revive = for_model(args.schedule, model)  # a preset as calibrated for this model
    norevive = replace(revive, revive=False)
    runs = {"baseline": None, "revival": revive, "norevive": norevive}
    for lazy in runs.values():  # warm-up
        timed_steps(model, prompt[:256], lazy, 4)
    results = {
        name: timed_steps(model, prompt, lazy, args.max_tokens) for name, lazy in runs.items()
    }

    base_ttft, base_times, _ = results["baseline"]
    _, revive_times, revive_layers = results["revival"]
    _, norevive_times, _ = results["norevive"]
    deferred = [layers - num_layers for layers in revive_layers]
    plain_step = statistics.median(norevive_times)
    extra = [t - plain_step for t in revive_times]
    cost = least_squares_slope(deferred, extra)
    prefill_cost = base_ttft / (args.tokens * num_layers)
    explained = sum(cost * d for d in deferred) / max(1e-9, sum(extra))

    print(f"{args.tokens}-token prompt, schedule {revive.to_string()}, {args.max_tokens} tokens")
    print("step  baseline ms  revival ms  deferred token-layers  norevive ms")
    for i, (b, r, d, q) in enumerate(zip(base_times, revive_times, deferred, norevive_times)):
        if i < 8 or i % 8 == 7:
            print(f"{i + 1:4d} {b * 1e3:12.1f} {r * 1e3:11.1f} {d:22d} {q * 1e3:12.1f}")
    print(
        f"median step: baseline {statistics.median(base_times) * 1e3:.1f} ms, "
        f"norevive {plain_step * 1e3:.1f} ms, "
        f"revival {statistics.median(revive_times) * 1e3:.1f} ms"
    )
    print(
        f"deferred work: {sum(deferred)} token-layers "
        f"({sum(deferred) / (args.tokens * num_layers):.1%} of the prompt's), "
        f"fitted cost {cost * 1e3:.3f} ms per token-layer vs prefill {prefill_cost * 1e3:.3f} ms; "
        f"the fit explains {explained:.0%} of revival's extra time"
    )
    groups = by_deferred(deferred, revive_times)
    for label, count, median_time, median_deferred in groups:
        extra_per_layer = (median_time - plain_step) / max(1, median_deferred)
        print(
            f"revival steps with {label} deferred token-layers: {count}, median "
            f"{median_time * 1e3:.1f} ms ({extra_per_layer * 1e3:.2f} ms per deferred token-layer "
            "over the norevive step)"
        )
    row_costs = layer_row_costs(model)
    print(
        "one decoder layer on "
        + "/".join(str(n) for n in row_costs)
        + " tokens: "
        + "/".join(f"{c * 1e3:.2f}" for c in row_costs.values())
        + " ms"
    )
    context = revive.resolve(num_layers).present_counts(args.tokens)[-1 if revive.boundaries else 0]
    attention = attention_row_costs(model, context)
    print(
        f"attention of 1/2/4/8/16 queries over {context} keys: "
        + "/".join(f"{a * 1e3:.2f}" for a, _ in attention.values())
        + " ms, of which the softmax "
        + "/".join(f"{s * 1e3:.2f}" for _, s in attention.values())
        + " ms"
    )
    breakdown = {}
    for name in ("revival", "norevive"):
        breakdown[name] = stage_breakdown(model, prompt, runs[name], args.max_tokens)
        for row in breakdown[name]:
            print(
                f"{name} stage {row['stage']} ({row['layers']} layers): median "
                f"{row['tokens']:g} tokens, {row['stage_ms']:.1f} ms "
                f"({row['stage_ms'] / row['layers']:.2f} per layer), selection before it "
                f"{row['selection_ms']:.1f} ms"
            )
    speeds = {}
    for n in sorted({n for n in (8, 16, 32, 64, 128) if n < len(base_times)} | {len(base_times)}):
        if n:
            speeds[n] = {name: n / sum(times[:n]) for name, (_, times, _) in results.items()}
            s = speeds[n]
            print(
                f"first {n:3d} tokens: decode tok/s baseline {s['baseline']:.1f}, "
                f"revival {s['revival']:.1f} (×{s['revival'] / s['baseline']:.2f}), "
                f"norevive {s['norevive']:.1f} (×{s['norevive'] / s['baseline']:.2f})"
            )
    if args.json:
        report = {
            "command": "python tools/profile_decode.py "
            f"--tokens {args.tokens} --schedule {args.schedule} --max-tokens {args.max_tokens}",
            "model": args.model or "default",
            "steps": {name: times for name, (_, times, _) in results.items()},
            "deferred_token_layers": deferred,
            "cost_per_token_layer_s": cost,
            "prefill_cost_per_token_layer_s": prefill_cost,
            "explained": explained,
            "steps_by_deferred": groups,
            "layer_seconds_by_rows": row_costs,
            "decode_tps_first_n": speeds,
            "stage_breakdown": breakdown,
            "attention_seconds_by_rows": {"context": context, "attention_softmax": attention},
        }
        write_json(args.json, report, indent=1)


if __name__ == "__main__":
    main()
