"""The few per-architecture differences the engine needs, and a clear refusal for the rest.

The engine drives mlx-lm's own blocks: `block(h, mask, cache)` for every family below. What differs
is how tokens are embedded, how logits are produced, and which layers use a sliding window. A
model's Family is made once and kept with the model (family_of).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .pipeline import Pipeline
from .rope import PositionalRoPE, install


def _no_windows(model: nn.Module) -> list[int | None]:
    return [None] * len(model.layers)


def _llama_windows(model: nn.Module) -> list[int | None]:
    window = model.model.sliding_window
    return [window if getattr(layer, "use_sliding", False) else None for layer in model.layers]


def _gemma3_windows(model: nn.Module) -> list[int | None]:
    window = model.args.sliding_window
    return [window if layer.self_attn.is_sliding else None for layer in model.layers]


def _plain_embed(model: nn.Module) -> Callable[[mx.array], mx.array]:
    return lambda tokens: model.model.embed_tokens(tokens)


def _gemma3_embed(model: nn.Module) -> Callable[[mx.array], mx.array]:
    # Gemma scales embeddings by sqrt(hidden) rounded to bfloat16, exactly as mlx-lm does.
    scale = mx.array(model.args.hidden_size**0.5, mx.bfloat16)

    def embed(tokens: mx.array) -> mx.array:
        h = model.model.embed_tokens(tokens)
        return h * scale.astype(h.dtype)

    return embed


# model_type -> (embed, sliding windows per layer)
SUPPORTED = {
    "llama": (_plain_embed, _llama_windows),
    "mistral": (_plain_embed, _llama_windows),
    "smollm3": (_plain_embed, _llama_windows),
    "qwen2": (_plain_embed, _no_windows),
    "qwen3": (_plain_embed, _no_windows),
    "mixtral": (_plain_embed, _no_windows),
    "phi3": (_plain_embed, _no_windows),
    "gemma3_text": (_gemma3_embed, _gemma3_windows),
}

MLA = {
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v41", "kimi_k2", "kimi_k25",
    "kimi_k3", "minicpm3", "glm4_moe_lite", "glm_moe_dsa", "longcat_flash", "mistral4",
}  # fmt: skip
SSM_HYBRID = {
    "mamba", "mamba2", "falcon_mamba", "jamba", "falcon_h1", "nemotron_h", "granitemoehybrid",
    "lfm2", "lfm2_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "plamo2", "recurrent_gemma",
    "rwkv7", "kimi_linear", "bailing_hybrid", "olmo_hybrid", "baichuan_m1",
}  # fmt: skip


@dataclass
class Family:
    """Handles on one loaded mlx-lm model, for the lazy layer loop."""

    model_type: str
    layers: list[nn.Module]
    embed: Callable[[mx.array], mx.array]
    head: Callable[[mx.array], mx.array]  # final norm + logits
    windows: list[int | None]  # sliding window of each layer, None for full attention
    scales: list[float]  # attention scale of each layer
    ropes: list[PositionalRoPE]
    pipeline: Pipeline | None = None  # set when this rank holds only some layers (pipeline.py)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def model_type_of(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return getattr(model, "model_type", None) or getattr(args, "model_type", None) or "unknown"


def architecture_of(model: nn.Module) -> tuple[str, int, int, int, int]:
    """(model type, layers, hidden size, query heads, KV heads): what calibrations are keyed by."""
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", 0)
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    layers = len(getattr(model, "layers", []))
    return (model_type_of(model), layers, getattr(args, "hidden_size", 0), heads, kv_heads)


def check_supported(model_type: str) -> None:
    """Raise a ValueError that says why a model cannot be pruned by this engine."""
    if model_type in SUPPORTED:
        return
    supported = ", ".join(sorted(SUPPORTED))
    if model_type in MLA:
        why = (
            "it uses multi-head latent attention (MLA), whose compressed KV and decoupled RoPE "
            "keys do not go through the per-token RoPE and KV hooks LazyLLM needs"
        )
    elif model_type in SSM_HYBRID:
        why = (
            "it has recurrent (state-space / linear-attention) layers, whose state depends on "
            "every token in order, so tokens cannot be skipped at those layers"
        )
    else:
        why = "it is not one of the families the lazy engine has been checked on"
    raise ValueError(
        f"LazyLLM cannot prune model type {model_type!r}: {why}. Supported: {supported}. "
        "Use lazy=None to run it with plain mlx-lm."
    )


def _head(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """Final norm then logits; looked up at call time so a later quantization is picked up."""

    def head(h: mx.array) -> mx.array:
        h = model.model.norm(h)
        tied = getattr(model, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(model.args, "tie_word_embeddings", False)
        return model.model.embed_tokens.as_linear(h) if tied else model.lm_head(h)

    return head


def family_of(model: nn.Module) -> Family:
    """Handles on a loaded mlx-lm model, made once per model: the first call checks the
    architecture and installs the position-aware RoPE wrappers, later ones find them."""
    family = getattr(model, "_lazyllm_family", None)
    if family is None:
        family = _make_family(model)
        object.__setattr__(model, "_lazyllm_family", family)  # not a parameter or child
    return family


def _make_family(model: nn.Module) -> Family:
    model_type = model_type_of(model)
    check_supported(model_type)
    make_embed, windows_of = SUPPORTED[model_type]
    layers = list(model.layers)
    attentions = [layer.self_attn for layer in layers]
    return Family(
        model_type=model_type,
        layers=layers,
        embed=make_embed(model),
        head=_head(model),
        windows=windows_of(model),
        scales=[float(attn.scale) for attn in attentions],
        ropes=[install(attn) for attn in attentions],
    )
