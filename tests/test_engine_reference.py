"""The engine against a literal, independent LazyLLM (tests/reference_lazyllm.py)."""

from dataclasses import replace

import lazyllm_mlx.boundary as boundary
import lazyllm_mlx.stage_plan as stage_plan
from lazyllm_mlx import LazyConfig, make_lazy_cache
from lazyllm_mlx.engine import LazyStats, decode_step, prefill
from lazyllm_mlx.families import family_of
from lazyllm_mlx.runner import runner_for

import mlx.core as mx
import pytest
from reference_lazyllm import ReferenceLazyLLM
from tiny_models import random_prompt, store_positions, tiny_model


def prefill_and_decode_against(reference, runner, cache, prompt, revive: bool) -> LazyStats:
    """Chunked prefill then 8 greedy decode steps; logits and per-layer KV positions must match
    the reference after each call."""
    stats = LazyStats(runner.family.num_layers)
    logits, selections = prefill(runner, cache, prompt, stats, step_size=16)
    assert selections.selecting == revive  # decode steps select (revive) only with revival
    expected = reference.step(prompt.tolist())
    assert mx.abs(logits - expected).max().item() < 1e-4
    assert store_positions(cache) == [set(d) for d in reference.kv]
    for _ in range(8):
        token = mx.argmax(logits, axis=-1)
        logits = decode_step(runner, cache, token, stats, selections)
        expected = reference.step(token.tolist(), revive=revive, decoding=True)
        assert mx.abs(logits - expected).max().item() < 1e-4
        assert store_positions(cache) == [set(d) for d in reference.kv]
    return stats


@pytest.mark.parametrize("variant", ["masked", "gathered", "split"])
@pytest.mark.parametrize(
    "schedule, revive",
    [("paper", True), ("2:0.5,5:0.6,8:0.5", True), ("paper", False), ("4:0.3", True)],
)
def test_engine_matches_reference(schedule, revive, variant, monkeypatch):
    """Both ways of attending to the selected tokens (a mask over the store, or gathered keys),
    and the final stage's last token as a chunk of its own whenever there are others."""
    if variant == "gathered":
        monkeypatch.setattr(boundary, "MASK_MAX_QUERIES", 0)
    if variant == "split":
        monkeypatch.setattr(stage_plan, "SPLIT_MIN_TOKENS", 1)
    model = tiny_model("llama", num_hidden_layers=10)
    config = replace(LazyConfig.parse(schedule), revive=revive)
    cache = make_lazy_cache(model, config)
    reference = ReferenceLazyLLM(model, cache.schedule)
    runner = runner_for(model, cache.config)
    stats = prefill_and_decode_against(reference, runner, cache, random_prompt(40), revive)
    assert stats.revived == reference.revived
    if revive and schedule != "4:0.3":
        assert stats.revived > 0, "the scenario should exercise revival"


# The general ranking rule: observation windows that cross prefill chunks (16 tokens), pooling,
# max over heads, sinks, recent tokens, token budgets, one cut or several.
RULES = [
    "2:0.5,5:0.6,8:0.5;w=12;pool=3;heads=max;sink=2",
    "4:0.3;w=8;pool=5",
    "paper;w=3;recent=5",
    "3:12,6:8;w=4;pool=3",
    "2:0.6,6:0.5;w=20;heads=max;sink=3;recent=24",
    "2:0.5,5:0.6,8:0.5;w=4;pool=3;revive=0.3",  # pruned tokens revived only from the top 30 %
    "4:0.3;w=2;heads=max;revive=0.5",
    "2:0.5,5:0.6,8:0.5;w=4;pool=3;margin=0.5",  # computed tokens hold their place
    "paper;margin=2",
    "2:0.5,5:0.6,8:0.5;w=4;pool=3;cap=2",  # at most 2 pruned tokens back per boundary and step
    "4:0.3;w=2;revive=0.5;cap=1",
    "2:0.5,6:0.5;w=4;margin=0.5;cap=0",
    "2:0.5,5:0.6,8:0.5;w=4;pool=3;every=3",  # decode steps reselect every third step
    "3:12,6:8;w=4;margin=0.5;every=2",
]


@pytest.mark.parametrize("variant", ["masked", "gathered"])
@pytest.mark.parametrize("schedule", RULES)
def test_engine_matches_reference_with_the_general_rule(schedule, variant, monkeypatch):
    """The engine's window scoring, pooling, forced tokens and budgets against the literal rule,
    through a chunked prefill and decode steps with revival."""
    if variant == "gathered":
        monkeypatch.setattr(boundary, "MASK_MAX_QUERIES", 0)
    model = tiny_model("llama", num_hidden_layers=10)
    config = LazyConfig.parse(schedule)
    cache = make_lazy_cache(model, config)
    reference = ReferenceLazyLLM(model, cache.schedule, rule=config)
    runner = runner_for(model, cache.config)
    stats = prefill_and_decode_against(reference, runner, cache, random_prompt(40), revive=True)
    assert stats.revived == reference.revived
    assert cache.observed[1].size == config.window


@pytest.mark.parametrize("schedule", ["paper", "2:0.5,5:0.6,8:0.5", "paper;w=6;pool=3;sink=1"])
def test_engine_matches_reference_with_sliding_windows(schedule):
    """Window layers alternating with global ones: a stage's tokens are ranked by its last global
    layer, window layers attend only inside their window (prompt and decode cross it)."""
    model = tiny_model("llama_sliding")
    family = family_of(model)
    assert family.windows[:2] == [24, None]
    cache = make_lazy_cache(model, schedule)
    reference = ReferenceLazyLLM(model, cache.schedule, family.windows, cache.config)
    runner = runner_for(model, cache.config)
    stats = prefill_and_decode_against(reference, runner, cache, random_prompt(60), revive=True)
    assert stats.revived == reference.revived > 0


def test_a_decode_step_runs_each_layer_once():
    """Revived tokens and the new token go through a stage together: one call per layer."""
    model = tiny_model("llama", num_hidden_layers=10)
    family = family_of(model)
    cache = make_lazy_cache(model, "paper")
    runner = runner_for(model, cache.config)
    stats = LazyStats(family.num_layers)
    logits, selections = prefill(runner, cache, random_prompt(40), stats)
    calls = [0] * family.num_layers

    def counted(i, block):
        def call(*args, **kwargs):
            calls[i] += 1
            return block(*args, **kwargs)

        return call

    family.layers[:] = [counted(i, block) for i, block in enumerate(family.layers)]
    for _ in range(4):
        token = mx.argmax(logits, axis=-1)
        logits = decode_step(runner, cache, token, stats, selections)
    assert stats.revived > 0 and calls == [4] * family.num_layers


@pytest.mark.parametrize(
    "rule, option",
    [
        # revive=F skips the selected pruned tokens ranked below the top F of the selection
        ("2:0.5,5:0.6,8:0.5;w=2", ";revive=0.2"),
        # margin=F: computed tokens hold their place against pruned ones scoring up to 1 + F
        # times higher
        ("2:0.5,5:0.6,8:0.5;w=4;pool=3", ";margin=1"),
        # cap=N: at most N pruned tokens come back per boundary and decode step
        ("2:0.5,5:0.6,8:0.5;w=4;pool=3", ";cap=1"),
        # every=N: decode steps in between keep the last selection (nothing revived there)
        ("2:0.5,5:0.6,8:0.5;w=4;pool=3", ";every=4"),
    ],
)
def test_options_that_revive_fewer_tokens(rule, option):
    """The same prompt revives (and computes) fewer tokens than with LazyLLM's rule, and the
    reference agrees step by step."""
    model = tiny_model("llama", num_hidden_layers=10)
    prompt = random_prompt(40)
    revived = {}
    for extra in ("", option):
        config = LazyConfig.parse(rule + extra)
        cache = make_lazy_cache(model, config)
        reference = ReferenceLazyLLM(model, cache.schedule, rule=config)
        runner = runner_for(model, cache.config)
        stats = prefill_and_decode_against(reference, runner, cache, prompt, revive=True)
        revived[extra] = (stats.revived, stats.decode_token_layers)
    assert revived[""][0] > revived[option][0]
    assert revived[""][1] > revived[option][1]
