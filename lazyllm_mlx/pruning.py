"""Token importance from the last query's attention row, and top-k selection (pure functions)."""

from __future__ import annotations

import mlx.core as mx


def last_row_attention(
    query: mx.array, keys: mx.array, scale: float, allowed: mx.array | None = None
) -> mx.array:
    """Softmax attention of one query over `keys`, averaged over all query heads.

    query: (1, H, 1, D) already rotated; keys: (1, Hkv, N, D) with H a multiple of Hkv (GQA: each
    query head is scored against its own KV head). allowed: optional (N,) bool mask. Returns (N,)
    float32. Only this one row is computed, never an N×N matrix.
    """
    _, n_heads, _, head_dim = query.shape
    n_kv = keys.shape[1]
    q = query.reshape(1, n_kv, n_heads // n_kv, head_dim).astype(mx.float32) * scale
    logits = q @ keys.astype(mx.float32).transpose(0, 1, 3, 2)  # (1, Hkv, rep, N)
    if allowed is not None:
        logits = mx.where(allowed, logits, -mx.inf)
    probs = mx.softmax(logits, axis=-1)
    return probs.mean(axis=(0, 1, 2))


def scoring_layer(layers: range, windows: list[int | None]) -> int:
    """The layer of a stage whose last-token attention ranks the tokens at the next boundary.

    The stage's last full-attention layer, else its last layer. On models mixing sliding-window and
    global layers (Gemma 3) a window layer's last token never attends beyond its window, so its
    attention there carries no information on older tokens; a global layer's does.
    """
    full = [layer for layer in layers if windows[layer] is None]
    return full[-1] if full else layers[-1]


def _ranked(scores: mx.array) -> mx.array:
    """Scores with the last entry (the last token, always kept) pushed above everything."""
    n = scores.shape[0]
    return mx.where(mx.arange(n) == n - 1, mx.inf, scores)


def select_top(scores: mx.array, count: int) -> mx.array:
    """Indices of the `count` highest scores, always with the last index, in increasing order."""
    n = scores.shape[0]
    if count >= n:
        return mx.arange(n)
    top = mx.argpartition(-_ranked(scores), kth=count - 1)[:count]
    return mx.sort(top)


def split_top(scores: mx.array, count: int) -> tuple[mx.array, mx.array]:
    """(kept, dropped): the `count` highest-scoring indices and the rest, each sorted."""
    n = scores.shape[0]
    if count >= n:
        return mx.arange(n), mx.zeros((0,), dtype=mx.int32)
    order = mx.argpartition(-_ranked(scores), kth=count - 1)
    return mx.sort(order[:count]), mx.sort(order[count:])
