"""Every supported family on a tiny random mlx-lm model: exact when nothing is pruned (greedy
tokens, prefill and decode logits, mlx-lm's own forward pass afterwards), sound when pruning (a
position-based oracle for pruned prefill, revival and the once-per-layer invariant)."""

from __future__ import annotations

import functools

from lazyllm_mlx import LazyConfig, generate_step, make_lazy_cache
from lazyllm_mlx.engine import LazyStats, decode_step, prefill
from lazyllm_mlx.families import SUPPORTED, check_supported, family_of
from lazyllm_mlx.runner import runner_for

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from tiny_models import NOTHING_PRUNED, random_prompt, store_positions, tiny_gpt2, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "smollm3", "gemma3_text", "phi3"]
FAMILIES.append("llama_sliding")  # llama blocks with mlx-lm's sliding_attention layer types
WINDOWED = ["gemma3_text", "llama_sliding"]
WINDOW = 24  # tiny_models' sliding window: the prompts below are several times longer
PROMPT = 200


@functools.cache
def model_of(family: str):
    return tiny_model(family)


class _PositionsCache:
    """What an mlx-lm attention needs as `cache` to rotate tokens at given positions."""

    def __init__(self, positions: mx.array):
        self.offset = positions

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values


def pruned_prefill_oracle(model, tokens: mx.array, stage_positions: list[np.ndarray], schedule):
    """Last logits of a prefill computing stage k for `stage_positions[k]` only: each stage's
    tokens attend to each other under masks built here from their original positions."""
    family = family_of(model)
    hidden, positions = family.embed(tokens[None]), np.arange(tokens.shape[0])
    for stage, kept in zip(schedule.stages, stage_positions):
        rows = np.searchsorted(positions, kept)
        assert (positions[rows] == kept).all(), "a stage computes a token the previous one dropped"
        hidden, positions = hidden[:, mx.array(rows)], kept
        pos = mx.array(positions)
        for layer in stage:
            mask = pos[:, None] >= pos[None, :]
            if (window := family.windows[layer]) is not None:
                mask = mask & (pos[:, None] < pos[None, :] + window)
            hidden = model.layers[layer](hidden, mask, cache=_PositionsCache(pos))
    return family.head(hidden[:, -1:, :])[:, -1, :]


@pytest.mark.parametrize("lazy", NOTHING_PRUNED.values(), ids=NOTHING_PRUNED.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_mlx_lm(family, lazy):
    model = model_of(family)
    prompt = random_prompt(PROMPT)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=64)]
    got = [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=64)]
    assert got == expected
    assert len(set(expected)) > 1, "a constant continuation would prove little"


@pytest.mark.parametrize("step_size", [2048, 16, 7])
@pytest.mark.parametrize("lazy", NOTHING_PRUNED.values(), ids=NOTHING_PRUNED.keys())
@pytest.mark.parametrize("family", FAMILIES)
def test_last_logits_match_mlx_lm(family, lazy, step_size):
    model = model_of(family)
    prompt = random_prompt(PROMPT)
    expected = model(prompt[None])[:, -1, :]
    cache = make_lazy_cache(model, lazy)
    stats = LazyStats(len(model.layers))
    runner = runner_for(model, cache.config)
    got, _ = prefill(runner, cache, prompt, stats, step_size=step_size)
    assert mx.abs(got - expected).max().item() < 1e-4
    assert stats.prefill_fraction == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_logits_match_mlx_lm_step_by_step(family):
    """Nothing pruned, the decode steps (selection from layer 0 at every boundary) give mlx-lm's
    logits against its own caches, token by token, and revive nothing."""
    from mlx_lm.models.cache import make_prompt_cache

    model = model_of(family)
    prompt = random_prompt(100)
    mlx_cache = make_prompt_cache(model)
    expected = model(prompt[None], cache=mlx_cache)[:, -1, :]
    cache = make_lazy_cache(model, NOTHING_PRUNED["keep-all"])
    stats = LazyStats(len(model.layers))
    runner = runner_for(model, cache.config)
    got, selections = prefill(runner, cache, prompt, stats)
    for _ in range(10):
        assert mx.abs(got - expected).max().item() < 1e-4
        token = mx.argmax(expected, axis=-1)
        expected = model(token[None], cache=mlx_cache)[:, -1, :]
        got = decode_step(runner, cache, token, stats, selections)
    assert stats.revived == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_still_runs_in_mlx_lm_after_lazy_use(family):
    """The RoPE wrappers the engine installs leave mlx-lm's own forward pass unchanged."""
    model = model_of(family)
    prompt = random_prompt(60)
    before = model(prompt[None])
    list(generate_step(prompt, model, lazy="paper", max_tokens=4))
    assert mx.array_equal(model(prompt[None]), before)


@pytest.mark.parametrize("step_size", [2048, 16])
@pytest.mark.parametrize("schedule", ["paper", "2:0.5,5:0.6,8:0.5"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prefill_matches_a_position_oracle(family, schedule, step_size):
    model = model_of(family)
    prompt = random_prompt(PROMPT)
    cache = make_lazy_cache(model, schedule)
    stats = LazyStats(len(model.layers))
    runner = runner_for(model, cache.config)
    got, _ = prefill(runner, cache, prompt, stats, step_size=step_size)
    stage_positions = [np.array(s.positions[: s.size]) for s in cache.stages]
    assert [len(p) for p in stage_positions] == cache.schedule.present_counts(PROMPT)
    assert all(p[-1] == PROMPT - 1 for p in stage_positions), "the last token is always kept"
    expected = pruned_prefill_oracle(model, prompt, stage_positions, cache.schedule)
    assert mx.abs(got - expected).max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_prunes_the_expected_fraction_and_decodes_with_revival(family):
    model = model_of(family)
    prompt = random_prompt(PROMPT)
    config = LazyConfig.preset("paper")
    cache = make_lazy_cache(model, config)
    stats = LazyStats(len(model.layers))
    steps = generate_step(
        prompt, model, lazy=config, max_tokens=24, prompt_cache=cache, stats=stats
    )
    tokens = [t for t, _ in steps]
    schedule = cache.schedule
    assert len(tokens) == 24
    assert stats.prefill_fraction == pytest.approx(schedule.prefill_fraction(PROMPT))
    counts = schedule.present_counts(PROMPT)
    assert stats.prefill_tokens_per_layer == [
        counts[k] for k, stage in enumerate(schedule.stages) for _ in stage
    ]
    assert stats.revived > 0, "decoding should bring pruned tokens back from the aux caches"
    # Each token at most once per layer over the whole generation: unique positions per stage,
    # one KV entry per computed token-layer, never more work than the baseline.
    positions = store_positions(cache)
    total = PROMPT + stats.decode_steps
    assert all(p <= set(range(total)) for p in positions)
    kv_entries = sum(s.size * len(s.layers) for s in cache.stages)
    assert kv_entries == stats.prefill_token_layers + stats.decode_token_layers
    assert kv_entries <= total * schedule.num_layers


@pytest.mark.parametrize("lazy", NOTHING_PRUNED.values(), ids=NOTHING_PRUNED.keys())
@pytest.mark.parametrize("family", WINDOWED)
def test_sliding_windows_with_chunked_prefill_match_mlx_lm(family, lazy):
    """mlx-lm's chunked prefill (rotating window caches) against ours, chunks below the window."""
    model = model_of(family)
    prompt = random_prompt(5 * WINDOW)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=32, prefill_step_size=7)]
    got = [
        t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=32, prefill_step_size=7)
    ]
    assert got == expected


@pytest.mark.parametrize("family", WINDOWED)
def test_sliding_window_layers_read_only_their_window(family, monkeypatch):
    """Like mlx-lm's rotating caches, a window layer of the unpruned stage reads at most the keys
    its queries can see; global layers read everything."""
    from lazyllm_mlx import engine

    model = model_of(family)
    windows = family_of(model).windows
    fetched: list[tuple[int, int, int]] = []  # (layer, queries, keys) of stage 0
    fetch = engine.LayerView.update_and_fetch

    def recording(view, keys, values):
        k, v = fetch(view, keys, values)
        if view.store.layers.start == 0:
            fetched.append((view.store.layers[view.layer], keys.shape[2], k.shape[2]))
        return k, v

    monkeypatch.setattr(engine.LayerView, "update_and_fetch", recording)
    prompt = random_prompt(5 * WINDOW)
    steps = generate_step(prompt, model, lazy="none", max_tokens=4, prefill_step_size=16)
    assert len(list(steps)) == 4
    decode = [(layer, keys) for layer, queries, keys in fetched if queries == 1][-len(windows) :]
    assert [layer for layer, _ in decode] == list(range(len(windows)))
    for (_, keys), window in zip(decode, windows):
        assert keys == WINDOW if window else keys > prompt.size
    for layer, queries, keys in fetched:
        if windows[layer] is not None:
            assert keys <= queries + WINDOW - 1


@pytest.mark.parametrize("family", WINDOWED)
def test_the_window_is_read_from_the_model_and_matters(family):
    model = model_of(family)
    handles = family_of(model)
    if family == "gemma3_text":
        sliding = [layer.self_attn.is_sliding for layer in model.layers]
        # Sliding layers rotate with their own base (rope_local_base_freq), global ones not.
        bases = {(s, r.inner.base) for r, s in zip(handles.ropes, sliding)}
        assert bases == {(True, 1e4), (False, 1e6)}
    else:
        sliding = [layer.use_sliding for layer in model.layers]
    assert handles.windows == [WINDOW if s else None for s in sliding]
    assert any(sliding) and not all(sliding)
    # The tests above are sensitive to the window: without it mlx-lm's logits change.
    prompt = random_prompt(PROMPT)[None]
    unwindowed = tiny_model(family, sliding_window=4096)
    assert mx.abs(unwindowed(prompt) - model(prompt))[:, -1].max().item() > 1e-2


def test_supported_table_covers_the_documented_families():
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "smollm3"):
        assert model_type in SUPPORTED
    assert {"gemma3_text", "phi3"} <= SUPPORTED.keys()


def test_other_model_types_get_a_clear_error_listing_the_supported_ones():
    _, gpt2 = tiny_gpt2(vocab=64)
    prompt = mx.array([1, 2, 3])
    with pytest.raises(ValueError, match="cannot prune model type 'gpt2'") as error:
        next(generate_step(prompt, gpt2, lazy="paper", max_tokens=2))
    for name in SUPPORTED:
        assert name in str(error.value)
    assert "lazy=None" in str(error.value)
    assert len([t for t, _ in generate_step(prompt, gpt2, lazy=None, max_tokens=2)]) == 2


@pytest.mark.parametrize(
    "model_type, why",
    [
        ("deepseek_v3", "multi-head latent attention"),
        ("kimi_k2", "multi-head latent attention"),
        ("mamba2", "recurrent"),
        ("jamba", "recurrent"),
        ("qwen3_next", "recurrent"),
        ("bert", "not one of the families"),
    ],
)
def test_mla_and_ssm_models_are_refused_with_the_reason(model_type, why):
    with pytest.raises(ValueError, match=why) as error:
        check_supported(model_type)
    assert "Supported: gemma3_text, llama, mistral" in str(error.value)
