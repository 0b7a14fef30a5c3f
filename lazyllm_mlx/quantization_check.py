"""What `convert -q` does to a model: the perplexity of the quantized weights against the source's
on a short built-in text, and, when it degrades, the settings that would not.

Quantization is simulated weight by weight, exactly as mlx-lm would quantize it (the same layers,
group size, bits and mode; its recipes and the model's own predicate): each quantized layer's
weight is replaced by its dequantized quantization. On a GPU the simulation runs the quantized
layers themselves (MLX's kernels); on the CPU, where those are slow, the dequantized weights in
float32 (see `_platform.default_dtype`). A perplexity more than THRESHOLD above the source's is
reported with the smallest affine setting (bits per weight, scales included) that stays within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ._platform import default_dtype

THRESHOLD = 0.10  # a perplexity 10 % above the source's is a damaged model
# Plain English prose, written for this check: what any chat model should find ordinary.
TEXT = (
    "A lighthouse keeper's day began before sunrise. The lamp had to be trimmed, the lens "
    "cleaned of soot and salt, and the clockwork that turned the light wound again before the "
    "evening. In fog the keeper sounded a horn every half minute, sometimes through the whole "
    "night, and wrote down each hour in the log: the weather, the ships that passed, the oil "
    "that was burned. Supplies came by boat once a month when the sea allowed it, so a family "
    "on the rock kept a garden, salted fish and read the same few books many times. Most "
    "keepers remembered the storms best. Waves broke over the gallery, the tower shook, and "
    "the light had to keep turning while the glass rattled in its frame. When the lights were "
    "made automatic, the last keepers left their towers, and many of the houses beside them "
    "became museums where visitors can climb the stairs and look out over the water."
)
TEXT_TOKENS = 256  # at most: a forward pass of this length is cheap for any model


@dataclass
class Check:
    """Perplexities on TEXT: the source's, the converted model's, and what a fix would give."""

    source: float
    converted: float
    setting: str  # e.g. "4 bits, groups of 64 (affine)"
    suggestion: str | None = None  # the smallest setting within THRESHOLD, when degraded
    tried: dict[str, float] = field(default_factory=dict)  # setting -> perplexity

    @property
    def increase(self) -> float:
        return self.converted / self.source - 1

    @property
    def degraded(self) -> bool:
        return self.increase > THRESHOLD

    def summary(self) -> str:
        return (
            f"perplexity on the built-in text: source {self.source:.2f}, converted "
            f"{self.converted:.2f} ({self.increase:+.1%}) with {self.setting}"
        )

    def warning(self) -> str | None:
        if not self.degraded:
            return None
        advice = (
            f"{self.suggestion} stays within {THRESHOLD:.0%}"
            if self.suggestion
            else "no affine setting tried stayed within it (" + self._tried() + ")"
        )
        return (
            f"quantization with {self.setting} raises the perplexity by {self.increase:.0%} "
            f"(more than {THRESHOLD:.0%}): the converted model may answer badly; {advice}"
        )

    def _tried(self) -> str:
        return ", ".join(f"{k}: {v:.2f}" for k, v in self.tried.items())


def perplexity(model: nn.Module, tokens: list[int]) -> float:
    inputs = mx.array(tokens, dtype=mx.int32)[None]
    logits = model(inputs[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, inputs[:, 1:], reduction="mean")
    return math.exp(loss.item())


Predicate = Callable[[str, nn.Module], "bool | dict"]


def plan(model: nn.Module, group_size: int, bits: int, mode: str, predicate: Predicate | None):
    """{layer path: quantization parameters} of the layers mlx-lm's quantize_model quantizes."""
    predicate = predicate or getattr(model, "quant_predicate", None)
    layers = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        chosen = predicate(path, module) if predicate is not None else True
        if chosen:
            params = dict(group_size=group_size, bits=bits, mode=mode)
            layers[path] = {**params, **chosen} if isinstance(chosen, dict) else params
    return layers


def simulated_perplexity(
    model: nn.Module, tokens: list[int], layers: dict[str, dict], source: dict[str, mx.array]
) -> float:
    """The perplexity with `layers` quantized as planned from the `source` weights (in the dtype
    they are saved in); the model is left as it was."""
    compute = default_dtype()
    leaves = model.leaf_modules()
    originals = dict(tree_flatten(model.parameters()))
    try:
        if compute is None:  # a GPU: its quantized kernels
            nn.quantize(model, class_predicate=lambda p, _: layers.get(p, False))
        else:  # the CPU: dequantized weights in its dtype
            updates = []
            for path, params in layers.items():
                weight = _round_trip(source[f"{path}.weight"], **params)
                updates.append((f"{path}.weight", weight.astype(compute)))
            model.load_weights(updates, strict=False)
        return perplexity(model, tokens)
    finally:
        model.update_modules(leaves)
        model.load_weights(list(originals.items()), strict=False)


def _round_trip(weight: mx.array, group_size: int, bits: int, mode: str) -> mx.array:
    quantized = mx.quantize(weight, group_size, bits, mode=mode)
    return mx.dequantize(*quantized, group_size=group_size, bits=bits, mode=mode)


def check_quantization(
    model: nn.Module,
    tokenizer: Any,
    group_size: int,
    bits: int,
    mode: str = "affine",
    predicate: Predicate | None = None,
) -> Check:
    """Measure what quantizing `model` as mlx-lm would (before it is quantized)."""
    tokens = tokenizer.encode(TEXT)[:TEXT_TOKENS]
    weights = dict(tree_flatten(model.parameters()))
    with _in_dtype(model, default_dtype()):
        source = perplexity(model, tokens)
        layers = plan(model, group_size, bits, mode, predicate)
        converted = simulated_perplexity(model, tokens, layers, weights)
        check = Check(source, converted, _describe(bits, group_size, mode, predicate))
        if check.degraded:  # plain affine settings: a recipe would override their bits
            without = " without --quant-predicate" if predicate is not None else ""
            for b, g in _alternatives(bits, group_size, mode):
                name = _describe(b, g, "affine", None)
                check.tried[name] = simulated_perplexity(
                    model, tokens, plan(model, g, b, "affine", None), weights
                )
                if check.tried[name] / source - 1 <= THRESHOLD:
                    check.suggestion = f"--q-bits {b} --q-group-size {g}{without} ({name})"
                    break
    return check


def _alternatives(bits: int, group_size: int, mode: str) -> list[tuple[int, int]]:
    """Affine settings at least as fine as the one given, cheapest first (bits per weight with a
    float16 scale and bias per group)."""
    choices = {(b, g) for b in (bits, 5, 6, 8) for g in (group_size, 64, 32)}
    if mode == "affine":
        choices = {(b, g) for b, g in choices if b >= bits and g <= group_size}
        choices.discard((bits, group_size))
    choices = {(b, g) for b, g in choices if 2 <= b <= 8 and g in (32, 64, 128)}
    return sorted(choices, key=lambda c: (c[0] + 32 / c[1], -c[1]))[:4]


def _describe(bits: int, group_size: int, mode: str, predicate: Any) -> str:
    recipe = ", a mixed-bit recipe" if predicate is not None else ""
    return f"{bits} bits, groups of {group_size} ({mode}{recipe})"


class _in_dtype:
    """The model's floating weights in `dtype` while the check runs (None: as they are)."""

    def __init__(self, model: nn.Module, dtype: mx.Dtype | None):
        self.model, self.dtype = model, dtype

    def __enter__(self) -> None:
        self.originals = dict(tree_flatten(self.model.parameters()))
        if self.dtype is not None:
            cast = [
                (name, p.astype(self.dtype))
                for name, p in self.originals.items()
                if mx.issubdtype(p.dtype, mx.floating) and p.dtype != self.dtype
            ]
            self.model.load_weights(cast, strict=False)

    def __exit__(self, *exc: Any) -> None:
        self.model.load_weights(list(self.originals.items()), strict=False)
