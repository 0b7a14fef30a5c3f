"""Sliding-window layers of the unpruned first stage keep only their window (plus a little slack
for trimming), as mlx-lm's rotating caches do: the same tokens, less memory, and a trim that
refuses to go where the dropped keys would be needed."""

from __future__ import annotations

from lazyllm_mlx import generate_step, make_lazy_cache
from lazyllm_mlx import stores as stores_module
from lazyllm_mlx.families import family_of
from lazyllm_mlx.prompt_cache import load_lazy_cache, save_lazy_cache
from lazyllm_mlx.pruning import scoring_layer

import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from tiny_models import KEEP_ALL, random_prompt, tiny_model

WINDOW = 24  # tiny_models' sliding window
SLACK, STEP = 8, 16  # small enough that a 200-token prompt drops keys
FAMILIES = ["gemma3_text", "llama_sliding"]


@pytest.fixture(autouse=True)
def small_slack(monkeypatch):
    monkeypatch.setattr(stores_module, "TRIM_SLACK", SLACK)
    monkeypatch.setattr(stores_module, "STEP", STEP)


def run(model, prompt, lazy, cache=None, max_tokens=24, step=32):
    steps = generate_step(
        prompt, model, lazy=lazy, prompt_cache=cache, max_tokens=max_tokens, prefill_step_size=step
    )
    return [t for t, _ in steps]


def dropped_layers(model, cache) -> list[int]:
    """Layers of the first stage whose buffers no longer start at the first token."""
    windows = family_of(model).windows
    store = cache.stages[0]
    for j, layer in enumerate(store.layers):
        held = store.keys[j][..., : store.held(j), :].shape[2]
        assert held == store.held(j) == store.size - store.base[j]
        if store.base[j]:
            assert windows[layer] is not None
            assert held >= WINDOW  # what the next query reads is still there
    return [layer for j, layer in enumerate(store.layers) if store.base[j]]


@pytest.mark.parametrize("lazy", ["none", KEEP_ALL], ids=["none", "keep-all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_window_keys_keeps_mlx_lm_tokens(family, lazy):
    model = tiny_model(family)
    prompt = random_prompt(200)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=24, prefill_step_size=32)]
    cache = make_lazy_cache(model, lazy)
    assert run(model, prompt, lazy, cache) == expected
    windows = family_of(model).windows
    first = cache.stages[0].layers
    scoring = scoring_layer(first, windows) if lazy != "none" else None
    windowed = [layer for layer in first if windows[layer] is not None and layer != scoring]
    assert dropped_layers(model, cache) == windowed
    store = cache.stages[0]
    for j in range(len(first)):  # a window layer holds at most window + slack + two steps
        assert store.keys[j].shape[2] <= (
            store.size if store.base[j] == 0 else WINDOW + SLACK + 2 * STEP + 32
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_generation_is_the_same_with_or_without_dropping(family, monkeypatch):
    model = tiny_model(family)
    prompt = random_prompt(200)
    cache = make_lazy_cache(model, "paper")
    dropping = run(model, prompt, "paper", cache)
    assert dropped_layers(model, cache)
    monkeypatch.setattr(stores_module, "TRIM_SLACK", 10_000)
    keeping = make_lazy_cache(model, "paper")
    assert run(model, prompt, "paper", keeping) == dropping
    assert not dropped_layers(model, keeping)


@pytest.mark.parametrize("family", FAMILIES)
def test_trim_within_the_slack_works_and_beyond_it_refuses(family):
    model = tiny_model(family)
    first, second, third = (random_prompt(n, seed=s) for n, s in ((200, 1), (6, 2), (3, 4)))
    reference = make_lazy_cache(model, "none")
    run(model, first, "none", reference, max_tokens=1)
    expected = run(model, third, "none", reference, max_tokens=8)

    cache = make_lazy_cache(model, "none")
    run(model, first, "none", cache, max_tokens=1)
    assert dropped_layers(model, cache)
    offset = cache.offset
    run(model, second, "none", cache, max_tokens=2)  # a turn we then take back
    assert cache.trim(cache.offset) == 0  # back to the start: the dropped keys would be needed
    assert cache.offset == offset + second.size + 2
    assert cache.trim(cache.offset - offset) == second.size + 2
    assert cache.offset == offset
    assert run(model, third, "none", cache, max_tokens=8) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_cache_with_dropped_keys_loads_and_goes_on(family, tmp_path):
    model = tiny_model(family)
    cache = make_lazy_cache(model, "paper")
    run(model, random_prompt(200, seed=1), "paper", cache, max_tokens=4)
    assert dropped_layers(model, cache)
    path = tmp_path / "cache.safetensors"
    save_lazy_cache(path, cache, model)
    loaded, _ = load_lazy_cache(path, model)
    assert loaded.stages[0].base == cache.stages[0].base
    assert loaded.kv_bytes() == cache.kv_bytes()
    follow_up = random_prompt(20, seed=3)
    assert run(model, follow_up, "paper", loaded) == run(model, follow_up, "paper", cache)
