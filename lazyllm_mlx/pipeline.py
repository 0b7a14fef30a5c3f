"""Pipeline parallel: each rank of an `mx.distributed` group holds a contiguous range of layers.

Every rank runs the same lazy layer loop, so the host-side decisions (stages, boundaries, which
tokens are kept and revived) are made identically everywhere; a rank computes only the layers it
owns. Where one rank's range ends, the tokens in flight travel to the next rank at that point of
the loop, after any boundary before it: only the kept and revived tokens' hidden states are
sent. A boundary's scores come from the rank that owns its scoring layer (one collective per
boundary), and the last layer's output from its owner (one per call), so every rank samples the
same token. A rank keeps the KV of its own layers only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class Pipeline:
    """The group and the first layer of each rank's range (rank order is layer order)."""

    group: mx.distributed.Group
    starts: tuple[int, ...]
    num_layers: int

    @property
    def rank(self) -> int:
        return self.group.rank()

    def owner(self, layer: int) -> int:
        return bisect.bisect_right(self.starts, layer) - 1

    def owns(self, layer: int) -> bool:
        return self.owner(layer) == self.rank

    def enter(self, layer: int, x: mx.array) -> mx.array:
        """`x` as `layer` takes it: where the layer begins a rank's range, the previous rank
        sends its tokens in flight (and waits until they are taken) and the owner receives."""
        owner = self.owner(layer)
        if layer == 0 or self.starts[owner] != layer:
            return x
        if self.rank == owner - 1:
            _now(mx.distributed.send(x, owner, group=self.group))
        elif self.rank == owner:
            return _now(mx.distributed.recv_like(x, owner - 1, group=self.group))
        return x

    def from_owner(self, x: mx.array, layer: int) -> mx.array:
        """The owner of `layer`'s `x` on every rank (the others add zeros: exact)."""
        mine = x if self.owns(layer) else mx.zeros(x.shape, x.dtype)
        return _now(mx.distributed.all_sum(mine, group=self.group))


def _now(sent: mx.array) -> mx.array:
    """Evaluate a communication where the loop issues it. Each rank's graph holds only some of
    them (a receiver's gather may wait on a score reduction its sender already ran): run lazily,
    two ranks could take them in different orders and wait on each other for ever."""
    mx.eval(sent)
    return sent


def split_layers(num_layers: int, size: int, split: list[int] | None = None) -> tuple[int, ...]:
    """The first layer of each of `size` ranks: `split` layers each, or an even split (the
    lower ranks take the extra layers)."""
    if split is None:
        base, extra = divmod(num_layers, size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
    if len(split) != size or any(n <= 0 for n in split) or sum(split) != num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers over {size} processes as {split}: each needs "
            "at least one layer"
        )
    return tuple(sum(split[:r]) for r in range(size))


def pipeline_of(model: nn.Module) -> Pipeline | None:
    """The model's Pipeline if it was split with split_model, else None (kept on its Family)."""
    family = getattr(model, "_lazyllm_family", None)  # families.family_of's, if made
    return None if family is None else family.pipeline


def split_model(
    model: nn.Module, group: mx.distributed.Group, split: list[int] | None = None
) -> nn.Module:
    """Keep on this rank only its range of `model`'s layers (the embeddings, final norm and head
    stay on every rank, as in mlx-lm's pipelining), then evaluate what is left: a lazily loaded
    model reads only those weights. Returns the model."""
    from .families import family_of
    from .fingerprint import model_fingerprint

    family = family_of(model)  # windows, scales and RoPE hooks from the whole model first
    # Fingerprints (calibrations, prompt caches) must not depend on which layers a rank holds.
    prints = {dtypes: model_fingerprint(model, dtypes) for dtypes in (True, False)}
    starts = split_layers(family.num_layers, group.size(), split)
    pipeline = Pipeline(group, starts, family.num_layers)
    for layer in range(family.num_layers):
        if not pipeline.owns(layer):
            model.layers[layer] = None  # mlx-lm's pipelining leaves None for others' layers
            family.layers[layer] = None
    family.pipeline = pipeline
    object.__setattr__(model, "_lazyllm_fingerprints", prints)
    mx.eval(model.parameters())
    return model
