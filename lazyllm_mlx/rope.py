"""A position-aware wrapper around an mlx-lm attention's RoPE module.

mlx-lm attentions call `self.rope(queries, offset=cache.offset)` then `self.rope(keys, ...)`. Our
cache views hand over either an int (contiguous positions: the original fast path, bit-exact with
mlx-lm) or an array with one position per token, which we apply by treating every token as its own
batch row (mx.fast.rope takes one offset per batch row). The wrapper can also record its outputs so
the engine gets the rotated queries for scoring without touching the attention code.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class PositionalRoPE(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        # A plain object attribute, not a list, so recorded arrays never enter the parameter tree.
        self.recorder: Recorder | None = None

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if isinstance(offset, mx.array) and offset.ndim == 1:
            batch, heads, length, dims = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dims)
            out = self.inner(rows, offset=offset)
            out = out.reshape(batch, length, heads, dims).transpose(0, 2, 1, 3)
        else:
            out = self.inner(x, offset=offset)
        if self.recorder is not None:
            self.recorder.outputs.append(out)
        return out


class Recorder:
    """Collects the wrapper's outputs during one attention call: [queries, keys]."""

    def __init__(self) -> None:
        self.outputs: list[mx.array] = []


def install(attention: nn.Module) -> PositionalRoPE:
    """Swap in the wrapper once; it defers to the original for int offsets, so mlx-lm works."""
    if not isinstance(attention.rope, PositionalRoPE):
        attention.rope = PositionalRoPE(attention.rope)
    return attention.rope
