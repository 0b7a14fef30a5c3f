"""A later boundary's kept weights against the masked softmax recomputed from scratch."""

import lazyllm_mlx  # noqa: F401
from lazyllm_mlx.kept_weights import KeptWeights
from lazyllm_mlx.pruning import window_probabilities
from lazyllm_mlx.stores import ObservedQueries

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

HEADS, KV_HEADS, DIM, SCALE = 4, 2, 8, 0.35


def recomputed(window: ObservedQueries, keys, key_pos, selected) -> mx.array:
    rows = window_probabilities(window.queries, keys, SCALE, window.positions, key_pos, selected)
    return rows.mean(axis=0)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 6),
    prompt=st.integers(1, 30),
    steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**31 - 1)), max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_kept_weights_match_the_masked_softmax(width, prompt, steps, seed):
    """A prefill's entries, then decode steps that each store a new token plus a few revived
    older ones and select a random subset: every step's scores equal the recomputed ones."""
    rng = np.random.default_rng(seed)
    window, kept = ObservedQueries(width), KeptWeights(width)
    stored = [int(p) for p in rng.choice(prompt, size=max(1, prompt // 2), replace=False)]
    window.extend(mx.arange(prompt - min(width, prompt), prompt, dtype=mx.int32),
                  mx.random.normal((1, HEADS, min(width, prompt), DIM)))  # fmt: skip
    keys = mx.random.normal((1, KV_HEADS, len(stored), DIM))
    end = prompt
    for revived, step_seed in [(0, seed)] + steps:
        step_rng = np.random.default_rng(step_seed)
        if end > prompt or revived:  # a decode step: the new token and some absent ones
            absent = [p for p in range(end) if p not in stored]
            back = [int(p) for p in step_rng.permutation(absent)[:revived]] if absent else []
            stored += back + [end]
            keys = mx.concatenate([keys, mx.random.normal((1, KV_HEADS, len(back) + 1, DIM))], 2)
            window.extend(mx.array([end], dtype=mx.int32), mx.random.normal((1, HEADS, 1, DIM)))
            end += 1
        key_pos = mx.array(stored, dtype=mx.int32)
        selected = mx.array(step_rng.random(len(stored)) < 0.6)
        got = kept.per_head_scores(window, keys, key_pos, selected, SCALE)
        want = recomputed(window, keys, key_pos, selected)
        assert mx.allclose(got, want, atol=1e-6, rtol=1e-4).item()


def test_kept_weights_start_over_when_the_window_is_cut_back():
    """A conversation rewound (keep_before) forgets the weights; the next scores are right."""
    window = ObservedQueries(4)
    window.extend(mx.arange(6, dtype=mx.int32), mx.random.normal((1, HEADS, 6, DIM)))
    keys = mx.random.normal((1, KV_HEADS, 6, DIM))
    key_pos = mx.arange(6, dtype=mx.int32)
    selected = mx.array([True, False, True, True, False, True])
    window.kept = KeptWeights(4)
    window.kept.per_head_scores(window, keys, key_pos, selected, SCALE)
    window.keep_before(4)
    assert window.kept is None and window.added == 4
    window.extend(mx.array([4], dtype=mx.int32), mx.random.normal((1, HEADS, 1, DIM)))
    kept = KeptWeights(4)
    got = kept.per_head_scores(window, keys[..., :5, :], key_pos[:5], selected[:5], SCALE)
    assert mx.allclose(got, recomputed(window, keys[..., :5, :], key_pos[:5], selected[:5]),
                       atol=1e-6).item()  # fmt: skip
