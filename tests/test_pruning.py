"""Selection rules as properties: top-k by score, last token kept, order kept, counts from keep."""

import math

from lazyllm_mlx.config import kept_count
from lazyllm_mlx.pruning import last_row_attention, select_top, split_top

import mlx.core as mx
import numpy as np
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
def test_kept_count_is_the_ceiling_of_the_fraction(n, keep):
    count = kept_count(n, keep)
    assert 1 <= count <= n
    assert count == max(1, min(n, math.ceil(round(keep * n, 6))))
    assert kept_count(n, 1.0) == n


@given(n=st.integers(1, 5000), a=st.floats(0.01, 1.0), b=st.floats(0.01, 1.0))
def test_kept_count_grows_with_keep(n, a, b):
    lo, hi = sorted((a, b))
    assert kept_count(n, lo) <= kept_count(n, hi)


def test_last_row_attention_is_the_naive_attention_row_with_gqa():
    mx.random.seed(3)
    heads, kv_heads, n, dim = 8, 2, 37, 16
    query = mx.random.normal((1, heads, 1, dim))
    keys = mx.random.normal((1, kv_heads, n, dim))
    scale = dim**-0.5
    got = last_row_attention(query, keys, scale)
    rows = []
    for h in range(heads):
        logits = (query[0, h, 0] @ keys[0, h // (heads // kv_heads)].T) * scale
        rows.append(mx.softmax(logits))
    expected = mx.stack(rows).mean(axis=0)
    assert mx.allclose(got, expected, atol=1e-6)
    assert abs(got.sum().item() - 1.0) < 1e-5
    allowed = mx.arange(n) >= 5
    masked = last_row_attention(query, keys, scale, allowed)
    assert mx.all(masked[:5] == 0).item() and abs(masked.sum().item() - 1.0) < 1e-5
