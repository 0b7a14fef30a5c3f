"""Token importance from the attention of the last tokens' queries, and top-k selection (pure
functions on arrays).

The paper's rule is one query (the last token's), its softmax row averaged over the query heads.
The general rule lets the last W tokens' queries observe (each attending causally), combines the
heads by mean or max, and averages the scores over neighbouring positions; a few tokens (the first
sinks, the most recent ones) are always kept. Scoring costs O(W·N) per boundary, never N×N.
"""

from __future__ import annotations

import mlx.core as mx

_HIDDEN = -1e30  # a logit no key can beat: a row seeing no key stays finite (uniform, not NaN)


def window_probabilities(
    queries: mx.array,
    keys: mx.array,
    scale: float,
    query_pos: mx.array,
    key_pos: mx.array,
    allowed: mx.array | None = None,
) -> mx.array:
    """Softmax attention rows of W observing queries over N keys: (W, H, N) float32.

    queries: (1, H, W, D) already rotated, at positions query_pos (W,); keys: (1, Hkv, N, D) at
    key_pos (N,), H a multiple of Hkv (GQA: each query head against its own KV head). Each query
    sees the keys at or before its position (and in `allowed`, an optional (N,) bool mask); a key
    it does not see gets 0.
    """
    logits = attention_logits(queries, keys, scale)
    visible = key_pos[None, :] <= query_pos[:, None]
    if allowed is not None:
        visible = visible & allowed[None, :]
    probs = mx.softmax(mx.where(visible, logits, _HIDDEN), axis=-1)
    probs = mx.where(visible, probs, 0.0)  # a query seeing no key adds nothing
    return probs.swapaxes(0, 1)


def attention_logits(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Scaled dot products of W queries (1, H, W, D) with N keys (1, Hkv, N, D), each query head
    against its own KV head (GQA): (H, W, N) float32."""
    _, n_heads, width, head_dim = queries.shape
    n_kv = keys.shape[1]
    q = queries.reshape(1, n_kv, n_heads // n_kv, width, head_dim).astype(mx.float32) * scale
    k = keys.astype(mx.float32)[:, :, None].swapaxes(-1, -2)  # (1, Hkv, 1, D, N)
    return (q @ k).reshape(n_heads, width, -1)


def combine_heads(per_head: mx.array, heads: str) -> mx.array:
    """(H, N) per-head scores -> (N,): their mean, or their max."""
    return per_head.max(axis=0) if heads == "max" else per_head.mean(axis=0)


def window_attention(
    queries: mx.array,
    keys: mx.array,
    scale: float,
    query_pos: mx.array,
    key_pos: mx.array,
    allowed: mx.array | None = None,
    heads: str = "mean",
) -> mx.array:
    """Softmax attention of W observing queries over N keys, averaged over the queries, query
    heads combined by "mean" or "max" (see window_probabilities). Returns (N,) float32: zero
    where no query sees the key."""
    rows = window_probabilities(queries, keys, scale, query_pos, key_pos, allowed)
    return combine_heads(rows.mean(axis=0), heads)


def pool_by_position(scores: mx.array, positions: mx.array, kernel: int, capacity: int) -> mx.array:
    """Each score averaged over the `kernel` positions centred on its own (absent positions count
    as zero; positions must be < capacity), so a span's tokens rank together."""
    if kernel == 1:
        return scores
    half = kernel // 2
    dense = mx.zeros((capacity + 2 * half,), dtype=mx.float32)
    dense[positions + half] = scores
    sums = mx.concatenate([mx.zeros((1,), dtype=mx.float32), mx.cumsum(dense)])
    return (sums[positions + kernel] - sums[positions]) / kernel


def always_kept(positions: mx.array, sink: int, recent: int, end: int) -> mx.array:
    """Bool mask: the first `sink` and the last `recent` positions of a sequence of `end`."""
    return (positions < sink) | (positions >= end - recent)


def scoring_layer(layers: range, windows: list[int | None]) -> int:
    """The layer of a stage whose last-token attention ranks the tokens at the next boundary.

    The stage's last full-attention layer, else its last layer. On models mixing sliding-window and
    global layers (Gemma 3) a window layer's last token never attends beyond its window, so its
    attention there carries no information on older tokens; a global layer's does.
    """
    full = [layer for layer in layers if windows[layer] is None]
    return full[-1] if full else layers[-1]


def _ranked(scores: mx.array, forced: mx.array | None) -> mx.array:
    """Scores with the always-kept entries (default: the last one) pushed above everything."""
    if forced is None:
        forced = mx.arange(scores.shape[0]) == scores.shape[0] - 1
    return mx.where(forced, mx.inf, scores)


def select_top(scores: mx.array, count: int, forced: mx.array | None = None) -> mx.array:
    """Indices of the `count` highest scores, always with the `forced` ones (default: the last
    index; there must be at most `count`), in increasing order."""
    n = scores.shape[0]
    if count >= n:
        return mx.arange(n)
    top = mx.argpartition(-_ranked(scores, forced), kth=count - 1)[:count]
    return mx.sort(top)


def split_top(
    scores: mx.array, count: int, forced: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """(kept, dropped): select_top's indices and the rest, each sorted."""
    n = scores.shape[0]
    if count >= n:
        return mx.arange(n), mx.zeros((0,), dtype=mx.int32)
    order = mx.argpartition(-_ranked(scores, forced), kth=count - 1)
    return mx.sort(order[:count]), mx.sort(order[count:])
