"""End to end on the real default model (SmolLM2-135M-Instruct): exactness and a real answer."""

import pydoc_data.topics as topics

from lazyllm_mlx import LazyConfig, stream_generate

import pytest

FACT = "The name of the lighthouse keeper is Edgar Lindqvist."
QUESTION = "Question: What is the name of the lighthouse keeper? Answer in one sentence."


@pytest.fixture(scope="module")
def question_prompt(smollm2):
    """~640 tokens of real text (Python's reference docs) with one fact in the middle."""
    _, tokenizer, _ = smollm2
    filler = topics.topics["assert"] + topics.topics["pass"] + topics.topics["del"]
    half = len(filler) // 2
    text = f"{filler[:half]}\n{FACT}\n{filler[half:]}\n\n{QUESTION}"
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def run(smollm2, prompt, lazy, max_tokens=24):
    model, tokenizer, _ = smollm2
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, lazy=lazy))
    return [r.token for r in responses], "".join(r.text for r in responses), responses[-1]


def test_nothing_pruned_gives_the_baseline_tokens(smollm2, question_prompt):
    base_tokens, base_text, _ = run(smollm2, question_prompt, None)
    none_tokens, _, last = run(smollm2, question_prompt, "none")
    assert none_tokens == base_tokens
    assert last.lazy.prefill_fraction == 1.0
    assert "Edgar" in base_text


def test_paper_prunes_the_expected_fraction_and_still_answers(smollm2, question_prompt):
    _, text, last = run(smollm2, question_prompt, "paper")
    n = len(question_prompt)
    expected = LazyConfig.preset("paper").resolve(30).prefill_fraction(n)
    assert last.lazy.prefill_fraction == pytest.approx(expected)
    assert last.lazy.prefill_tokens_per_layer[:9] == [n] * 9
    assert last.lazy.prefill_tokens_per_layer[-1] < 0.35 * n
    assert "Edgar" in text


@pytest.mark.parametrize("preset", ["default", "fast"])
def test_the_calibrations_prune_their_fraction_and_still_answer(smollm2, question_prompt, preset):
    model, _, _ = smollm2
    from lazyllm_mlx.generate import for_model

    calibration = for_model(preset, model)
    assert calibration.window > 1 and calibration != LazyConfig.preset(preset)
    _, text, last = run(smollm2, question_prompt, preset)
    n = len(question_prompt)
    assert last.lazy.prefill_fraction == pytest.approx(calibration.resolve(30).prefill_fraction(n))
    assert last.lazy.prefill_fraction < 0.7
    assert "Edgar" in text
