"""Quantized models (QuantizedLinear / QuantizedEmbedding, 4 and 8 bits, groups 32/64/128) through
the lazy path: the same exactness against mlx-lm on the same quantized model."""

from __future__ import annotations

import functools

from lazyllm_mlx import generate_step, make_lazy_cache
from lazyllm_mlx.engine import LazyStats, prefill
from lazyllm_mlx.runner import runner_for

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.utils import quantize_model
from tiny_models import NOTHING_PRUNED, random_prompt, store_positions, tiny_model

BITS_AND_GROUPS = [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)]
# Tied embeddings (QuantizedEmbedding.as_linear), biases + lm_head, scaled embeddings and windows,
# fused qkv, quantized experts.
FAMILIES = ["llama", "qwen2", "gemma3_text", "phi3", "mixtral"]
PROMPT = 96


@functools.cache
def quantized(family: str, bits: int, group_size: int) -> nn.Module:
    # 128 wide so that every group size divides every input dimension.
    model = tiny_model(family, hidden_size=128, intermediate_size=256)
    model, config = quantize_model(model, {}, group_size, bits)
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    mx.eval(model.parameters())
    return model


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return [m for _, m in model.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("bits, group_size", BITS_AND_GROUPS)
def test_every_projection_and_the_embedding_are_quantized(bits, group_size):
    model = quantized("llama", bits, group_size)
    modules = quantized_modules(model)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for _, m in model.named_modules())
    assert {(m.bits, m.group_size) for m in modules} == {(bits, group_size)}


@pytest.mark.parametrize("lazy", NOTHING_PRUNED.values(), ids=NOTHING_PRUNED.keys())
@pytest.mark.parametrize("bits, group_size", BITS_AND_GROUPS)
def test_bits_and_group_sizes_give_mlx_lm_tokens(bits, group_size, lazy):
    model = quantized("llama", bits, group_size)
    prompt = random_prompt(PROMPT)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=24)]
    got = [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=24)]
    assert got == expected and len(set(expected)) > 1


@pytest.mark.parametrize("lazy", NOTHING_PRUNED.values(), ids=NOTHING_PRUNED.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_families_give_mlx_lm_tokens_and_logits(family, lazy):
    model = quantized(family, 4, 64)
    assert quantized_modules(model)
    prompt = random_prompt(PROMPT)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=24)]
    got = [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=24)]
    assert got == expected and len(set(expected)) > 1
    for step_size in (2048, 16):
        cache = make_lazy_cache(model, lazy)
        stats = LazyStats(len(model.layers))
        runner = runner_for(model, cache.config)
        logits, _ = prefill(runner, cache, prompt, stats, step_size=step_size)
        assert mx.abs(logits - model(prompt[None])[:, -1, :]).max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_paper_prunes_and_revives(family):
    model = quantized(family, 4, 64)
    prompt = random_prompt(PROMPT)
    cache = make_lazy_cache(model, "paper")
    stats = LazyStats(len(model.layers))
    steps = generate_step(
        prompt, model, lazy="paper", max_tokens=16, prompt_cache=cache, stats=stats
    )
    assert len(list(steps)) == 16
    assert stats.prefill_fraction == pytest.approx(cache.schedule.prefill_fraction(PROMPT))
    assert stats.revived > 0
    store_positions(cache)  # asserts no token holds KV twice in a stage
