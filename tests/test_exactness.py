"""With nothing pruned, the lazy path is mlx-lm: same greedy tokens, same logits."""

from lazyllm_mlx import LazyConfig, generate_step, make_lazy_cache
from lazyllm_mlx.engine import LazyStats, lazy_forward
from lazyllm_mlx.families import family_of

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from tiny_models import random_prompt, tiny_model

# keep=0.99999 keeps every token of these prompts but runs the whole selection machinery
# (scoring, top-k, gathered keys, per-token RoPE, revival bookkeeping).
NOTHING_PRUNED = ["none", LazyConfig(boundaries=(3, 6, 9), keep=(0.99999,) * 3)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("lazy", NOTHING_PRUNED, ids=["none", "keep-all"])
def test_greedy_tokens_match_mlx_lm(family, lazy):
    model = tiny_model(family)
    prompt = random_prompt(200)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=64)]
    got = [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=64)]
    assert got == expected


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("lazy", NOTHING_PRUNED, ids=["none", "keep-all"])
@pytest.mark.parametrize("step_size", [2048, 64, 7])
def test_last_logits_match_mlx_lm(family, lazy, step_size):
    model = tiny_model(family)
    prompt = random_prompt(150)
    expected = model(prompt[None])[:, -1, :]
    cache = make_lazy_cache(model, lazy)
    stats = LazyStats(len(model.layers))
    family_handles = family_of(model)
    got = lazy_forward(
        family_handles, cache, prompt, stats, prune=True, decoding=False, step_size=step_size
    )
    assert mx.abs(got - expected).max().item() < 1e-4
    assert stats.prefill_fraction == 1.0


def test_decode_logits_match_mlx_lm_step_by_step():
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_model("llama")
    prompt = random_prompt(100)
    mlx_cache = make_prompt_cache(model)
    expected = model(prompt[None], cache=mlx_cache)[:, -1, :]
    lazy = NOTHING_PRUNED[1]
    cache = make_lazy_cache(model, lazy)
    stats = LazyStats(len(model.layers))
    family = family_of(model)
    got = lazy_forward(family, cache, prompt, stats, prune=True, decoding=False)
    for _ in range(10):
        assert mx.abs(got - expected).max().item() < 1e-4
        token = mx.argmax(expected, axis=-1)
        expected = model(token[None], cache=mlx_cache)[:, -1, :]
        got = lazy_forward(family, cache, token, stats, prune=True, decoding=True)
    assert stats.revived == 0


def test_model_still_works_with_mlx_lm_after_lazy_use():
    model = tiny_model("llama")
    prompt = random_prompt(60)
    before = model(prompt[None])
    list(generate_step(prompt, model, lazy="paper", max_tokens=4))
    assert mx.array_equal(model(prompt[None]), before)
