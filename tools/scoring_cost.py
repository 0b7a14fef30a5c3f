"""What ranking tokens costs: one boundary's scoring against the prefill it prunes.

    python tools/scoring_cost.py --lengths 1024,2048,4096 --schedule default

For each prompt length, times (median of 5, after a warm-up) the window rule's scoring at one
boundary on random queries and keys of the model's shapes: the observation window's softmax rows
over every key (O(W·N), never N×N), the head reduction and the pooling, then the top-k selection;
and per decode step, the one new row the first boundary's kept rows need, and the whole masked
window a later boundary recomputed before kept weights, and the kept weights' step (a new query's
row, the new entries' columns, the renormalisation). Beside it, the schedule's TTFT on
real text, so the table reads as a share of the prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lazyllm_mlx  # noqa: F401  (before mlx: OpenBLAS preload)
from lazyllm_mlx import load
from lazyllm_mlx.evals.measure import generate_once, warm_up
from lazyllm_mlx.evals.sources import real_text_tokens
from lazyllm_mlx.families import family_of
from lazyllm_mlx.generate import for_model
from lazyllm_mlx.kept_weights import KeptWeights
from lazyllm_mlx.output_files import write_json
from lazyllm_mlx.pruning import pool_by_position, select_top, window_attention, window_probabilities
from lazyllm_mlx.stores import ObservedQueries

import mlx.core as mx


def timed(fn, repeats: int = 5) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kept_step_time(queries, kv_heads: int, head_dim: int, length: int, scale: float) -> float:
    """Median seconds of a later boundary's decode step with kept weights (kept_weights): one
    query enters the window, 5 entries are stored (the new token and 4 revived), half selected."""
    steps, new = 6, 5
    keys = mx.random.normal((1, kv_heads, length + steps * new, head_dim))
    positions = mx.arange(keys.shape[2], dtype=mx.int32)
    allowed = positions % 2 == 0
    width = queries.shape[2]
    window, kept = ObservedQueries(width), KeptWeights(width)
    window.extend(positions[length - width : length], queries)
    mx.eval(
        kept.per_head_scores(
            window, keys[..., :length, :], positions[:length], allowed[:length], scale
        )
    )
    times = []
    for step in range(1, steps + 1):
        n = length + step * new
        window.extend(positions[n - 1 : n], queries[..., -1:, :])
        start = time.perf_counter()
        mx.eval(kept.per_head_scores(window, keys[..., :n, :], positions[:n], allowed[:n], scale))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--schedule", default="default")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    family = family_of(model)
    config = for_model(args.schedule, model)
    schedule = config.resolve(family.num_layers)
    attention = model.layers[0].self_attn
    heads, kv_heads = attention.n_heads, attention.n_kv_heads
    head_dim = model.args.hidden_size // heads
    head_dim = getattr(model.args, "head_dim", None) or head_dim
    scale = family.scales[0]
    print(f"schedule {config.to_string()}: {len(schedule.boundaries)} boundaries, window "
          f"{config.window}, pool {config.pool}, heads {config.heads}; {heads}/{kv_heads} heads "
          f"of {head_dim}")  # fmt: skip
    print(f"{'tokens':>7}{'score ms':>10}{'select ms':>10}{'decode row ms':>14}"
          f"{'later decode ms':>16}{'later kept ms':>14}"
          f"{'TTFT s':>8}{'scoring / TTFT':>16}")  # fmt: skip
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        w = min(config.window, length)
        queries = mx.random.normal((1, heads, w, head_dim))
        keys = mx.random.normal((1, kv_heads, length, head_dim))
        positions = mx.arange(length, dtype=mx.int32)

        def score(q=queries, k=keys, p=positions, w=w, n=length, allowed=None):
            ranked = window_attention(q, k, scale, p[-w:], p, allowed, config.heads)
            return pool_by_position(ranked, p, config.pool, n)

        scores = score()
        count = max(1, round(schedule.keep[0] * length)) if schedule.keep else length
        score_s = timed(score)
        select_s = timed(lambda s=scores, c=count: select_top(s, c))
        row_s = timed(lambda q=queries, k=keys, p=positions: window_probabilities(
            q[..., -1:, :], k, scale, p[-1:], p))  # fmt: skip
        # A later boundary ranks a masked selection: its window's rows are recomputed each step.
        half = mx.arange(length) % 2 == 0
        masked_s = timed(lambda f=score, a=half: f(allowed=a))
        kept_s = kept_step_time(queries, kv_heads, head_dim, length, scale)
        tokens = real_text_tokens(tokenizer, length)
        warm_up(model, tokenizer, tokens, [config])
        ttft = statistics.median(
            generate_once(model, tokenizer, tokens, config, max_tokens=1).last.ttft
            for _ in range(3)
        )
        boundaries = len(schedule.boundaries)
        share = boundaries * (score_s + select_s) / ttft
        rows.append(dict(tokens=length, score_s=score_s, select_s=select_s, decode_row_s=row_s,
                         later_boundary_decode_s=masked_s, later_boundary_kept_s=kept_s,
                         ttft=ttft, boundaries=boundaries, share_of_ttft=share))  # fmt: skip
        print(f"{length:>7}{score_s * 1e3:>10.2f}{select_s * 1e3:>10.2f}{row_s * 1e3:>14.3f}"
              f"{masked_s * 1e3:>16.2f}{kept_s * 1e3:>14.2f}"
              f"{ttft:>8.2f}{share:>16.2%}")  # fmt: skip
    if args.json:
        write_json(
            args.json, dict(command=vars(args), schedule=config.to_string(), rows=rows), indent=1
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
