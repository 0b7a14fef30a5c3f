"""A position-aware wrapper around an mlx-lm attention's RoPE module, which also hands the engine
the rotated queries it scores with.

mlx-lm attentions call `self.rope(queries, offset=cache.offset)` then `self.rope(keys, ...)`. Our
cache views hand over either an int (contiguous positions: the original fast path, bit-exact with
mlx-lm) or an array with one position per token, which we apply by treating every token as its own
batch row (mx.fast.rope takes one offset per batch row). A view that wants the rotated queries
hands over a `Rotations` instead: the wrapper applies its offset and appends what it computes
(queries, then keys), so the capture travels with the call and no module state changes. mlx-lm's
own forward pass (the probe) captures through `capturing`, for the length of a `with` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn


class Rotations:
    """An attention call's RoPE offset, and the rotated tensors RoPE computes in it: [queries,
    keys] for every family the engine supports."""

    def __init__(self, offset: int | mx.array):
        self.offset = offset
        self.outputs: list[mx.array] = []


class PositionalRoPE(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        # A plain object attribute, not a list, so captured arrays never enter the parameter tree.
        self.captured: list[mx.array] | None = None

    def __call__(self, x: mx.array, offset: int | mx.array | Rotations = 0) -> mx.array:
        rotations = offset if isinstance(offset, Rotations) else None
        if rotations is not None:
            offset = rotations.offset
        if isinstance(offset, mx.array) and offset.ndim == 1:
            batch, heads, length, dims = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dims)
            out = self.inner(rows, offset=offset)
            out = out.reshape(batch, length, heads, dims).transpose(0, 2, 1, 3)
        else:
            out = self.inner(x, offset=offset)
        if rotations is not None:
            rotations.outputs.append(out)
        if self.captured is not None:
            self.captured.append(out)
        return out


@contextmanager
def capturing(ropes: list[PositionalRoPE]) -> Iterator[list[list[mx.array]]]:
    """Each wrapper's outputs while the block runs (per wrapper: [queries, keys] per call)."""
    captured: list[list[mx.array]] = [[] for _ in ropes]
    for rope, outputs in zip(ropes, captured):
        rope.captured = outputs
    try:
        yield captured
    finally:
        for rope in ropes:
            rope.captured = None


def install(attention: nn.Module) -> PositionalRoPE:
    """Swap in the wrapper once; it defers to the original for int offsets, so mlx-lm works."""
    if not isinstance(attention.rope, PositionalRoPE):
        attention.rope = PositionalRoPE(attention.rope)
    return attention.rope
