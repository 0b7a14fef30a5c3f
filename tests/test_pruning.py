"""Selection rules as properties: top-k by score, forced tokens kept, order kept, counts from keep,
and the ranking rule's pieces (window attention, pooling, always-kept tokens) against naive code."""

from lazyllm_mlx.config import boundary_count, kept_count
from lazyllm_mlx.pruning import (
    always_kept,
    pool_by_position,
    select_top,
    split_top,
    window_attention,
)

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

scores_lists = st.lists(
    st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=300, unique=True
)


@settings(max_examples=200, deadline=None)
@given(scores=scores_lists, keep=st.floats(0.01, 1.0))
def test_select_top_keeps_the_highest_the_last_and_the_order(scores, keep):
    n = len(scores)
    count = kept_count(n, keep)
    kept = np.array(select_top(mx.array(scores), count)).tolist()
    assert len(kept) == count
    assert kept == sorted(kept) and len(set(kept)) == count
    assert n - 1 in kept
    others = [scores[i] for i in kept if i != n - 1]
    dropped = [scores[i] for i in range(n) if i not in kept]
    if others and dropped:
        assert min(others) > max(dropped)


@settings(max_examples=200, deadline=None)
@given(scores=scores_lists, keep=st.floats(0.01, 1.0))
def test_split_top_partitions_the_tokens(scores, keep):
    n = len(scores)
    count = kept_count(n, keep)
    kept, dropped = split_top(mx.array(scores), count)
    kept, dropped = np.array(kept).tolist(), np.array(dropped).tolist()
    assert sorted(kept + dropped) == list(range(n))
    assert kept == np.array(select_top(mx.array(scores), count)).tolist()
    assert dropped == sorted(dropped)


@given(n=st.integers(1, 100_000), keep=st.floats(0.001, 1.0))
def test_kept_count_keeps_the_fraction_and_not_one_token_more(n, keep):
    count = kept_count(n, keep)
    assert 1 <= count <= n
    assert count >= keep * n - 1e-6  # at least the fraction asked for (up to float noise)
    assert count == 1 or count - 1 < keep * n + 1e-6  # one token fewer would fall short
    assert kept_count(n, 1.0) == n


def test_kept_count_is_not_fooled_by_float_noise():
    assert 0.07 * 100 > 7 and kept_count(100, 0.07) == 7
    assert kept_count(3, 1 / 3) == 1 and kept_count(1000, 0.7) == 700
    assert kept_count(7, 0.0001) == 1  # the last token always goes on


@given(n=st.integers(1, 5000), a=st.floats(0.01, 1.0), b=st.floats(0.01, 1.0))
def test_kept_count_grows_with_keep(n, a, b):
    lo, hi = sorted((a, b))
    assert kept_count(n, lo) <= kept_count(n, hi)


def naive_window_scores(queries, keys, scale, query_pos, key_pos, allowed, heads):
    """Per query head and observing query: a softmax over the keys it sees; mean over queries."""
    n_heads, n_kv = queries.shape[1], keys.shape[1]
    q, k = np.array(queries[0]), np.array(keys[0])
    per_head = np.zeros((n_heads, k.shape[1]))
    for h in range(n_heads):
        for i, p in enumerate(query_pos):
            seen = [j for j, a in enumerate(key_pos) if a <= p and allowed[j]]
            logits = k[h // (n_heads // n_kv), seen] @ q[h, i] * scale
            probs = np.exp(logits - logits.max())
            per_head[h, seen] += probs / probs.sum() / len(query_pos)
    return per_head.max(axis=0) if heads == "max" else per_head.mean(axis=0)


@pytest.mark.parametrize("heads", ["mean", "max"])
@pytest.mark.parametrize("width", [1, 5])
def test_window_attention_is_the_naive_causal_window_with_gqa(width, heads):
    mx.random.seed(3)
    n_heads, n_kv, n, dim = 8, 2, 37, 16
    queries = mx.random.normal((1, n_heads, width, dim))
    keys = mx.random.normal((1, n_kv, n, dim))
    key_pos = mx.array(np.sort(np.random.default_rng(1).choice(80, n, replace=False)))
    query_pos = key_pos[-width:]
    allowed = mx.arange(n) >= 5
    scale = dim**-0.5
    for mask in (None, allowed):
        got = window_attention(queries, keys, scale, query_pos, key_pos, mask, heads)
        expected = naive_window_scores(
            queries,
            keys,
            scale,
            np.array(query_pos),
            np.array(key_pos),
            np.ones(n, bool) if mask is None else np.array(mask),
            heads,
        )
        assert np.allclose(np.array(got), expected, atol=1e-6)
    if heads == "mean":  # each query's row sums to one, so their mean does too
        assert abs(got.sum().item() - 1.0) < 1e-5 and mx.all(got[:5] == 0).item()


@settings(max_examples=100, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=60),
    kernel=st.sampled_from([1, 3, 5, 7, 13]),
    seed=st.integers(0, 1000),
)
def test_pool_by_position_averages_over_neighbouring_positions(scores, kernel, seed):
    n = len(scores)
    capacity = n + 20
    positions = np.sort(np.random.default_rng(seed).choice(capacity, n, replace=False))
    by_position = dict(zip(positions.tolist(), scores))
    half = kernel // 2
    expected = [
        sum(by_position.get(q, 0.0) for q in range(p - half, p + half + 1)) / kernel
        for p in positions.tolist()
    ]
    got = pool_by_position(mx.array(scores), mx.array(positions), kernel, capacity)
    assert np.allclose(np.array(got), expected, atol=1e-5)


@given(n=st.integers(1, 200), sink=st.integers(0, 10), recent=st.integers(1, 30))
def test_always_kept_is_the_sinks_and_the_recent_tokens(n, sink, recent):
    positions = mx.arange(n)
    kept = np.array(always_kept(positions, sink, recent, n)).tolist()
    assert kept == [p < sink or p >= n - recent for p in range(n)]
    assert kept[-1]


@settings(max_examples=200, deadline=None)
@given(scores=scores_lists, keep=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_select_top_keeps_every_forced_index(scores, keep, seed):
    n = len(scores)
    forced = np.random.default_rng(seed).random(n) < 0.1
    count = boundary_count(n, keep, int(forced.sum()))
    kept = np.array(select_top(mx.array(scores), count, mx.array(forced))).tolist()
    assert len(kept) == count and set(np.flatnonzero(forced)) <= set(kept)
    others = [scores[i] for i in kept if not forced[i]]
    dropped = [scores[i] for i in range(n) if i not in kept]
    if others and dropped:
        assert min(others) > max(dropped)


@given(n=st.integers(1, 10_000), budget=st.integers(2, 5000), forced=st.integers(0, 100))
def test_a_budget_keeps_that_many_tokens_and_at_least_the_forced(n, budget, forced):
    count = boundary_count(n, float(budget), forced)
    assert count == min(n, max(budget, forced))
    assert kept_count(n, float(budget)) == min(n, budget)
