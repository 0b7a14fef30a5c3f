"""What the tests share: tiny random mlx-lm models (one per family, from mlx-lm's own ModelArgs),
a tiny tokenizer, random prompts, the schedules that prune nothing, and the KV positions a cache
holds."""

from __future__ import annotations

import lazyllm_mlx  # noqa: F401  (OpenBLAS preload before mlx)
from lazyllm_mlx import LazyConfig
from lazyllm_mlx._mlx_lm_private import model_from_config

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=10,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
    max_position_embeddings=4096,
)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=16, rope_theta=1e6),
    "mixtral": dict(
        model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6
    ),
    # Every third layer without RoPE (NoPE), as SmolLM3 does every fourth.
    "smollm3": dict(
        model_type="smollm3", tie_word_embeddings=True, no_rope_layer_interval=3, rope_theta=1e5
    ),
    # Two sliding-window layers (own RoPE base) then one global, a window far below the prompts.
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=24,
        sliding_window_pattern=3,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rms_norm_eps=1e-6,
    ),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, partial_rotary_factor=0.5),
    # llama blocks with alternating sliding-window layers (mlx-lm's `layer_types`).
    "llama_sliding": dict(
        model_type="llama",
        tie_word_embeddings=True,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention"] * 5,
    ),
}


# keep=0.99999 keeps every token of the tests' prompts but runs the whole selection machinery
# (scoring, top-k, gathered keys, per-token RoPE, revival bookkeeping).
KEEP_ALL = LazyConfig(boundaries=(3, 6, 9), keep=(0.99999,) * 3)
NOTHING_PRUNED = {"none": "none", "keep-all": KEEP_ALL}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    config = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    mx.random.seed(seed)
    model = model_from_config(config)
    # Larger-than-default weights so attention is peaked and token choices are not near-ties.
    params = [(k, v * 2.0) for k, v in tree_flatten(model.parameters()) if "norm" not in k]
    if config["model_type"] == "gemma3_text":
        # Gemma norms scale by 1 + w: zero is the unit norm the other families start from.
        params += [
            (k, mx.zeros_like(v)) for k, v in tree_flatten(model.parameters()) if "norm" in k
        ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def tiny_gpt2(vocab: int = 128) -> tuple[dict, nn.Module]:
    """(config, model) of a tiny gpt2: a family the engine cannot prune, for the refusal tests."""
    config = dict(
        model_type="gpt2",
        n_ctx=64,
        n_embd=32,
        n_head=2,
        n_layer=2,
        n_positions=64,
        layer_norm_epsilon=1e-5,
        vocab_size=vocab,
    )
    return config, model_from_config(config)


def random_prompt(length: int, vocab: int = 128, seed: int = 1) -> mx.array:
    mx.random.seed(seed)
    return mx.random.randint(0, vocab, (length,)).astype(mx.int32)


def tiny_tokenizer(vocab: int = 128) -> TokenizerWrapper:
    """Whitespace word-level tokenizer over "t0" … "t{vocab-1}"; "t0" is BOS and EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0")
    return TokenizerWrapper(fast)


def store_positions(cache) -> list[set[int]]:
    """Per layer, the positions holding KV in a LazyCache; fails if a stage holds one twice."""
    out = []
    for store in cache.stages:
        positions = set(np.array(store.positions[: store.size]).tolist())
        assert len(positions) == store.size, "a token holds KV twice in one stage"
        out += [positions] * len(store.layers)
    return out
