"""The public API: load-style calls, responses, stats, and errors raised before any work."""

import math

from lazyllm_mlx import (
    LazyConfig,
    LazyStats,
    generate,
    generate_step,
    make_lazy_cache,
    stream_generate,
)
from lazyllm_mlx._mlx_lm_private import model_from_config
from lazyllm_mlx.instrument import Instrument, instrumented
from lazyllm_mlx.lazy_steps import RequestSteps

import pytest
from tiny_models import random_prompt, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def prompt_text(n: int) -> str:
    return " ".join(f"t{i}" for i in random_prompt(n, seed=5).tolist() if i != 0) or "t5"


@pytest.mark.parametrize("lazy", [None, "none", "paper", LazyConfig.parse("3:0.5;norevive")])
def test_stream_generate_responses(model, tokenizer, lazy):
    responses = list(stream_generate(model, tokenizer, prompt_text(120), max_tokens=8, lazy=lazy))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.ttft > 0 and last.prompt_tps > 0 and last.peak_memory > 0
    assert last.prompt_tokens == len(tokenizer.encode(prompt_text(120)))
    if lazy is None:
        assert last.lazy is None
    else:
        config = LazyConfig.parse(lazy) if isinstance(lazy, str) else lazy
        expected = config.resolve(10).prefill_fraction(last.prompt_tokens)
        assert last.lazy.prefill_fraction == pytest.approx(expected)


def test_token_list_prompt_and_generate_text(model, tokenizer):
    tokens = random_prompt(50).tolist()
    text = generate(model, tokenizer, tokens, max_tokens=5, lazy="paper")
    again = "".join(r.text for r in stream_generate(model, tokenizer, tokens, 5, lazy="paper"))
    assert text == again


def test_generate_verbose_prints_stats(model, tokenizer, capsys):
    generate(model, tokenizer, prompt_text(80), max_tokens=4, lazy="paper", verbose=True)
    out = capsys.readouterr().out
    assert "Time to first token" in out and "prefill computed" in out


def test_prefill_fraction_and_counters_follow_the_schedule(model, tokenizer):
    prompt = random_prompt(333)
    config = LazyConfig.parse("2:0.6,5:0.5,8:0.4")
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=6, lazy=config))
    stats = responses[-1].lazy
    counts = config.resolve(10).present_counts(333)
    assert counts == [333, 200, 100, 40]
    assert stats.prefill_tokens_per_layer == [333] * 2 + [200] * 3 + [100] * 3 + [40] * 2
    assert stats.prefill_token_layers == sum(stats.prefill_tokens_per_layer)
    assert stats.prefill_fraction == pytest.approx(stats.prefill_token_layers / (333 * 10))
    # decode: one step per generated token but the last (mlx-lm computes one step ahead)
    assert stats.decode_steps == len(responses)
    assert stats.decode_token_layers <= stats.decode_steps * 10 + stats.revived * 8
    assert stats.aux_bytes > 0


def test_min_prompt_tokens_leaves_short_prompts_alone(model, tokenizer):
    config = LazyConfig.parse("paper;min=100")
    short = list(stream_generate(model, tokenizer, random_prompt(60), 3, lazy=config))[-1]
    long = list(stream_generate(model, tokenizer, random_prompt(160), 3, lazy=config))[-1]
    assert short.lazy.prefill_fraction == 1.0 and not short.lazy.pruned
    assert long.lazy.prefill_fraction < 1.0 and long.lazy.pruned


def test_decode_selection_shrinks_and_keeps_the_new_token(model):
    seen = []

    class Spy(Instrument):
        def call(self, kind, cache, tokens, run):
            self.kind, self.cache = kind, cache
            return run()

        def boundary(self, k, ranked, run):
            flight_out, attend = run()
            if self.kind == "decode":
                seen.append((k, ranked.n_candidates, attend.selected.tolist(), self.cache.offset))
            return flight_out, attend

    from lazyllm_mlx import generate_step

    with instrumented(Spy()):
        list(generate_step(random_prompt(90), model, lazy="paper", max_tokens=5))
    assert seen
    keep = LazyConfig.preset("paper").keep
    for k, n_candidates, selected, offset in seen:
        assert len(selected) == len(set(selected)) == math.ceil(keep[k - 1] * n_candidates)
        assert offset in selected  # the token being decoded sits at position cache.offset
    for (k1, _, sel1, off1), (k2, n2, sel2, off2) in zip(seen, seen[1:]):
        if off1 == off2 and k2 == k1 + 1:
            assert n2 == len(sel1)  # the next boundary ranks exactly what this one selected
            assert set(sel2) <= set(sel1)


PUBLIC_API = [
    "CalibrateOptions", "GenerationResponse", "LazyCache", "LazyConfig", "LazyStats", "calibrate",
    "convert", "default_schedule",
    "generate", "generate_step", "load", "load_lazy_cache", "make_lazy_cache", "save_lazy_cache",
    "stream_generate",
]  # fmt: skip


def test_the_public_api_is_the_package_s():
    import lazyllm_mlx

    assert sorted(lazyllm_mlx.__all__) == PUBLIC_API
    for name in PUBLIC_API:  # the functions and classes themselves, not modules of that name
        value = getattr(lazyllm_mlx, name)
        assert callable(value) and value.__module__.startswith("lazyllm_mlx."), name


def test_errors_before_any_work(model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        stream_generate(model, tokenizer, [], lazy="paper")
    with pytest.raises(ValueError, match="prompt is empty"):
        stream_generate(model, tokenizer, "", lazy=None)
    with pytest.raises(ValueError, match="more than the model's context of 4096"):
        stream_generate(model, tokenizer, [5] * 4097, lazy="paper")
    with pytest.raises(ValueError, match="out of range"):
        stream_generate(model, tokenizer, [5, 6], lazy="3:1.5")
    with pytest.raises(ValueError, match="outside 1..9"):
        stream_generate(model, tokenizer, [5, 6], lazy="12:0.5")
    with pytest.raises(ValueError, match="strictly increasing"):
        stream_generate(model, tokenizer, [5, 6], lazy="6:0.5,3:0.5")
    with pytest.raises(ValueError, match="Unknown LazyLLM preset|expected boundary:keep"):
        stream_generate(model, tokenizer, [5, 6], lazy="fastest")
    with pytest.raises(ValueError, match="non-zero"):
        stream_generate(model, tokenizer, [5, 6], max_tokens=0, lazy="paper")
    with pytest.raises(ValueError, match="different schedule"):
        stream_generate(
            model, tokenizer, [5, 6], lazy="paper", prompt_cache=make_lazy_cache(model, "none")
        )


def tiny_mamba():
    config = dict(
        model_type="mamba", vocab_size=64, hidden_size=32, intermediate_size=64, state_size=8,
        num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4,
    )  # fmt: skip
    return model_from_config(config)


def test_unprunable_architectures_are_refused(tokenizer):
    with pytest.raises(ValueError, match="cannot prune model type 'mamba'.*recurrent.*Supported"):
        stream_generate(tiny_mamba(), tokenizer, [5, 6, 7], lazy="paper")
    from lazyllm_mlx.families import check_supported

    with pytest.raises(ValueError, match="multi-head latent attention"):
        check_supported("deepseek_v3")
    with pytest.raises(ValueError, match="not one of the families"):
        check_supported("gpt2")


def test_baseline_path_is_plain_mlx_lm(model, tokenizer):
    from mlx_lm import stream_generate as mlx_stream_generate

    prompt = random_prompt(64).tolist()
    ours = list(stream_generate(model, tokenizer, prompt, 10, lazy=None))
    theirs = list(mlx_stream_generate(model, tokenizer, prompt, 10))
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert [r.text for r in ours] == [r.text for r in theirs]
    assert ours[-1].finish_reason == theirs[-1].finish_reason and ours[-1].lazy is None


def test_random_selection_keeps_the_counts(model, tokenizer):
    prompt = random_prompt(200)
    lazy = list(stream_generate(model, tokenizer, prompt, 3, lazy="paper"))[-1].lazy
    rand = list(stream_generate(model, tokenizer, prompt, 3, lazy="paper;random"))[-1].lazy
    assert rand.prefill_tokens_per_layer == lazy.prefill_tokens_per_layer


@pytest.mark.parametrize(
    "lazy, ahead", [("paper", 0), ("paper;norevive", 1), ("none", 1), ("paper;every=3", 1)]
)
def test_first_token_is_handed_out_before_a_revival_decode_step(model, lazy, ahead):
    """TTFT must not include the first decode step when that step waits on the host."""
    import importlib

    gen = importlib.import_module("lazyllm_mlx.generate")  # the package's `generate` is a function

    decode_calls = []

    class Spy(Instrument):
        def call(self, kind, cache, tokens, run):
            decode_calls.append(kind == "decode")
            return run()

    with instrumented(Spy()):
        steps = gen.generate_step(random_prompt(100), model, lazy=lazy, max_tokens=3)
        next(steps)
        assert sum(decode_calls) == ahead
        list(steps)
    assert sum(decode_calls) == 3  # every yielded token is fed, as in mlx-lm


@pytest.mark.parametrize("close_after", [2, 3, 4, 9])
def test_steps_that_keep_their_selection_are_computed_ahead_without_changing_anything(
    model, monkeypatch, close_after
):
    """every=N: the steps that keep the selections run one step ahead, the others after the
    token; the tokens, the counts and the cache are those of handing out every token first."""
    import importlib

    gen = importlib.import_module("lazyllm_mlx.generate")
    prompt, lazy = random_prompt(150), "paper;every=3"

    def run():
        cache = make_lazy_cache(model, lazy)
        stats = LazyStats(len(model.layers))
        steps = gen.generate_step(prompt, model, lazy=lazy, prompt_cache=cache, stats=stats)
        tokens = [token for _, (token, _) in zip(range(close_after), steps)]
        steps.close()
        return tokens, stats, cache

    ahead_tokens, ahead_stats, ahead_cache = run()
    # every step after its token is handed out: only the order changes, not what is computed
    monkeypatch.setattr(RequestSteps, "ahead", lambda steps: not steps.selections.selecting)
    tokens, stats, cache = run()
    assert ahead_tokens == tokens and len(tokens) == close_after
    assert ahead_cache.offset == cache.offset == prompt.size + close_after
    assert ahead_stats.decode_token_layers == stats.decode_token_layers
    assert ahead_stats.revived == stats.revived
    for a, b in zip(ahead_cache.stages, cache.stages):
        assert a.positions[: a.size].tolist() == b.positions[: b.size].tolist()


@pytest.mark.parametrize("lazy", ["4:0.5;w=4", None], ids=["lazy", "baseline"])
def test_two_threads_on_one_model_take_turns_and_get_what_one_thread_gets(model, lazy):
    import threading

    prompts = [random_prompt(40, seed=s) for s in (1, 2)]

    def tokens(prompt):
        return [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=12)]

    alone = [tokens(p) for p in prompts]
    got, errors = {}, []

    def run(i: int) -> None:
        try:
            for _ in range(3):
                got[i] = tokens(prompts[i])
        except Exception as error:  # a crash in a thread must fail the test, not vanish
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and [got[0], got[1]] == alone
    # one thread may still interleave its own generators on the model
    first, second = (generate_step(p, model, lazy=lazy, max_tokens=3) for p in prompts)
    assert [next(first)[0], next(second)[0]] == [alone[0][0], alone[1][0]]
