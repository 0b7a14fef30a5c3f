"""Conversations through a LazyCache, and saving/loading it."""

from lazyllm_mlx import LazyConfig, generate_step, make_lazy_cache
from lazyllm_mlx.prompt_cache import load_lazy_cache, save_lazy_cache

import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import KEEP_ALL, random_prompt, tiny_model

TURNS = [random_prompt(120, seed=1), random_prompt(80, seed=2), random_prompt(30, seed=3)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def converse(model, lazy, cache, turns=TURNS, max_tokens=12):
    return [
        [
            t
            for t, _ in generate_step(
                p, model, lazy=lazy, prompt_cache=cache, max_tokens=max_tokens
            )
        ]
        for p in turns
    ]


@pytest.mark.parametrize("lazy", ["none", KEEP_ALL], ids=["none", "keep-all"])
def test_turns_through_the_lazy_cache_match_mlx_lm(model, lazy):
    expected = [
        [t for t, _ in mlx_generate_step(p, model, prompt_cache=cache, max_tokens=12)]
        for cache in [make_prompt_cache(model)]
        for p in TURNS
    ]
    cache = make_lazy_cache(model, lazy)
    assert converse(model, lazy, cache) == expected
    assert cache.offset == sum(p.size for p in TURNS) + 3 * 12


def test_later_turns_prefill_only_their_tokens_and_can_revive(model):
    from lazyllm_mlx import stream_generate

    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    cache = make_lazy_cache(model, "paper")
    first = list(stream_generate(model, tokenizer, TURNS[0], 6, lazy="paper", prompt_cache=cache))
    second = list(stream_generate(model, tokenizer, TURNS[1], 6, lazy="paper", prompt_cache=cache))
    assert first[-1].lazy.prompt_tokens == TURNS[0].size
    assert second[-1].lazy.prompt_tokens == TURNS[1].size
    # the second prefill computes its own tokens (pruned, so under every layer) and revives older
    # tokens of turn one, which count apart so that the prefill fraction stays about this turn
    stats = second[-1].lazy
    expected = LazyConfig.preset("paper").resolve(10).prefill_fraction(TURNS[1].size)
    assert stats.prefill_fraction <= expected + 0.05
    assert stats.revival_token_layers > 0 and stats.revived > 0
    assert cache.offset == TURNS[0].size + TURNS[1].size + 12


@pytest.mark.parametrize("lazy", ["none", "paper"])
def test_save_and_load_round_trip(model, lazy, tmp_path):
    path = tmp_path / "cache.safetensors"
    cache = make_lazy_cache(model, lazy)
    converse(model, lazy, cache, TURNS[:1])
    save_lazy_cache(path, cache, model, {"document": "turn one"})
    sizes, aux_bytes = cache.tokens_per_layer(), cache.aux_bytes()
    expected = converse(model, lazy, cache, TURNS[1:])
    loaded, metadata = load_lazy_cache(path, model, LazyConfig.parse(lazy))
    assert metadata == {"document": "turn one"}
    assert loaded.offset == TURNS[0].size + 12
    assert loaded.tokens_per_layer() == sizes and loaded.aux_bytes() == aux_bytes
    assert converse(model, lazy, loaded, TURNS[1:]) == expected


def test_mismatched_or_broken_cache_files_are_refused(model, tmp_path):
    path = tmp_path / "cache.safetensors"
    cache = make_lazy_cache(model, "paper")
    converse(model, "paper", cache, TURNS[:1])
    save_lazy_cache(path, cache, model)
    with pytest.raises(ValueError, match="different model"):
        load_lazy_cache(path, tiny_model("llama", seed=7))
    with pytest.raises(ValueError, match="built with schedule"):
        load_lazy_cache(path, model, LazyConfig.preset("none"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lazy_cache(tmp_path / "missing.safetensors", model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable prompt cache"):
        load_lazy_cache(garbage, model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_lazy_cache(truncated, model)


def test_trim_takes_back_a_turn(model):
    """With nothing pruned, trimming back to turn one and going on equals never taking the turn."""
    lazy = "none"
    reference = make_lazy_cache(model, lazy)
    converse(model, lazy, reference, TURNS[:1])
    offset = reference.offset
    expected = converse(model, lazy, reference, TURNS[1:2])

    cache = make_lazy_cache(model, lazy)
    converse(model, lazy, cache, TURNS[:1])
    converse(model, lazy, cache, TURNS[2:3])  # a turn we then take back
    assert cache.trim(cache.offset - offset) == TURNS[2].size + 12
    assert cache.offset == offset and cache.tokens_per_layer() == [offset] * 10
    assert converse(model, lazy, cache, TURNS[1:2]) == expected


def test_trim_keeps_a_consistent_lazy_state(model):
    """Pruned tokens of the kept part stay revivable; revived KV of the kept part is kept."""
    cache = make_lazy_cache(model, "paper")
    converse(model, "paper", cache, TURNS[:1])
    offset, sizes = cache.offset, cache.tokens_per_layer()
    converse(model, "paper", cache, TURNS[1:2])
    cache.trim(cache.offset - offset)
    assert cache.offset == offset
    assert all(now >= before for now, before in zip(cache.tokens_per_layer(), sizes))
    for store in cache.stages:
        positions = store.positions[: store.size].tolist()
        assert len(set(positions)) == len(positions) and max(positions) < offset
        assert all(store.index_of[p].item() == i for i, p in enumerate(positions))
    for aux in cache.aux[1:]:
        assert all(p < offset for p in aux.positions[: aux.size].tolist())
    converse(model, "paper", cache, TURNS[2:3])  # and it goes on
    assert cache.offset == offset + TURNS[2].size + 12


def test_stopping_early_leaves_a_consistent_cache(model):
    """A stop callback or closing the stream: the cache holds exactly what was fed, and goes on."""
    from lazyllm_mlx import stream_generate

    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    calls = []
    cache = make_lazy_cache(model, "paper")
    responses = list(
        stream_generate(
            model, tokenizer, TURNS[0], 50, lazy="paper", prompt_cache=cache,
            should_stop=lambda: len(calls.append(1) or calls) >= 4,
        )
    )  # fmt: skip
    assert responses[-1].finish_reason == "cancelled" and len(responses) == 4
    assert cache.offset == TURNS[0].size + 4

    stream = stream_generate(model, tokenizer, TURNS[1], 50, lazy="paper", prompt_cache=cache)
    for _ in zip(range(3), stream):
        pass
    stream.close()
    assert cache.offset == TURNS[0].size + 4 + TURNS[1].size + 3
    for store in cache.stages:
        positions = store.positions[: store.size].tolist()
        assert len(set(positions)) == len(positions) < cache.offset + 1
    converse(model, "paper", cache, TURNS[2:3])


def test_a_lazy_cache_speaks_mlx_lm_cache_protocol(model):
    """mlx-lm's own helpers trim it and see its size; nbytes counts KV, aux rows and queries."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache = make_lazy_cache(model, "paper;w=4")
    assert cache.nbytes == 0 and cache.size() == 0
    converse(model, "paper;w=4", cache, TURNS[:1])
    held, kv = cache.nbytes, cache.kv_bytes()
    assert cache.size() == cache.offset == TURNS[0].size + 12
    assert held > kv > 0, "pruned tokens wait in the aux caches, queries in the windows"
    assert can_trim_prompt_cache([cache]) and trim_prompt_cache([cache], 5) == 5
    assert cache.size() == TURNS[0].size + 7 and cache.kv_bytes() < kv and cache.nbytes < held


def test_a_lazy_cache_rebuilt_from_its_state_continues_alike(model):
    """state and meta_state describe the cache whole: from_state gives one that generates the
    same tokens; empty() says whether it holds any token, as mlx-lm's caches do."""
    from lazyllm_mlx import LazyCache
    from lazyllm_mlx.families import family_of

    lazy = "paper;w=4"
    cache = make_lazy_cache(model, lazy)
    assert cache.empty() is True
    converse(model, lazy, cache, TURNS[:1])
    assert cache.empty() is False
    copy = LazyCache.from_state(cache.state, cache.meta_state, family_of(model).windows)
    assert copy.offset == cache.offset and copy.nbytes == cache.nbytes
    assert converse(model, lazy, copy, TURNS[1:2]) == converse(model, lazy, cache, TURNS[1:2])
