"""Prompt-cache files: checksummed, told apart from mlx-lm's, and mlx-lm's read as caches that
pruned nothing."""

from __future__ import annotations

import json

from lazyllm_mlx import load, load_lazy_cache, make_lazy_cache, save_lazy_cache, stream_generate
from lazyllm_mlx.cli import main

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.models.cache import (
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, random_prompt, tiny_model, tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}t2 {% else %}t3 {% endif %}"
    "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
)
DOCUMENT = " ".join(f"t{5 + (13 * i) % 120}" for i in range(180))
QUESTION = " t9 t10 t11"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A lazy cache of a pruned prefill, saved: (path, cache)."""
    cache = make_lazy_cache(model, "paper")
    for _ in stream_generate(model, tiny_tokenizer(), random_prompt(300), 3, lazy="paper",
                             prompt_cache=cache):  # fmt: skip
        pass
    path = tmp_path_factory.mktemp("cache") / "lazy.safetensors"
    save_lazy_cache(path, cache, model, {"document": "d"})
    return path, cache


def flipped(path, out, flips: int, seed: int, start: int = 0) -> None:
    data = np.frombuffer(path.read_bytes(), np.uint8).copy()
    rng = np.random.default_rng(seed)
    at = rng.integers(start, data.size, flips)
    data[at] ^= (1 << rng.integers(0, 8, flips)).astype(np.uint8)
    out.write_bytes(data.tobytes())


def data_start(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_cache_with_random_bit_flips_is_refused(model, saved, tmp_path):
    path, _ = saved
    broken = tmp_path / "broken.safetensors"
    flipped(path, broken, 2000, seed=0)
    with pytest.raises(ValueError, match="corrupt|not a readable"):
        load_lazy_cache(broken, model)
    flipped(path, broken, 1, seed=1, start=data_start(path))  # one bit of one stored value
    with pytest.raises(ValueError, match="checksum does not match"):
        load_lazy_cache(broken, model)
    cache, metadata = load_lazy_cache(path, model)  # the original still loads
    assert metadata == {"document": "d"} and cache.offset == saved[1].offset


def test_mlx_lm_is_told_what_our_file_is(saved):
    with pytest.raises(KeyError, match="a lazyllm-mlx prompt cache; load it with lazyllm_mlx"):
        load_prompt_cache(str(saved[0]))


def test_a_file_from_before_checksums_is_refused_with_the_way_out(model, saved, tmp_path):
    arrays, metadata = mx.load(str(saved[0]), return_metadata=True)
    header = json.loads(metadata["0.lazyllm"])
    old = tmp_path / "old.safetensors"
    mx.save_safetensors(str(old), arrays, {"lazyllm": json.dumps(dict(header, format="x/1"))})
    with pytest.raises(ValueError, match="earlier lazyllm-mlx, without a checksum"):
        load_lazy_cache(old, model)


def test_save_errors_name_the_file_asked_for(model, saved, tmp_path):
    target = tmp_path / "no-such-folder" / "c.safetensors"
    with pytest.raises(OSError, match=f"cannot write {target}") as error:
        save_lazy_cache(target, saved[1], model)
    assert ".c.safetensors." not in str(error.value)
    with pytest.raises(ValueError, match="dot-free"):
        save_lazy_cache(tmp_path / "x.safetensors", saved[1], model, {"a.b": "c"})


def mlx_lm_prefill(model, tokens, cache) -> None:
    for _ in mlx_generate_step(mx.array(tokens), model, max_tokens=0, prompt_cache=cache):
        pass


def test_an_mlx_lm_file_is_a_cache_that_pruned_nothing(model, tmp_path):
    tokens = random_prompt(200).tolist()
    caches = make_prompt_cache(model)
    mlx_lm_prefill(model, tokens, caches)
    path = tmp_path / "mlx-lm.safetensors"
    save_prompt_cache(str(path), caches, {"model": "somewhere"})
    cache, metadata = load_lazy_cache(path, model)
    assert metadata == {"model": "somewhere"} and cache.config.to_string() == "none"
    assert cache.offset == 200 and cache.tokens_per_layer() == [200] * len(model.layers)
    rest = random_prompt(7, seed=3)
    got = [r.token for r in stream_generate(model, tiny_tokenizer(), rest, 6, lazy="none",
                                            prompt_cache=cache)]  # fmt: skip
    whole = mx.array(tokens + rest.tolist())
    expected = [t for t, _ in mlx_generate_step(whole, model, max_tokens=6)]
    assert got == expected[: len(got)]
    with pytest.raises(ValueError, match="pruned nothing .schedule 'none'.. Continue it with"):
        load_lazy_cache(path, model, make_lazy_cache(model, "paper").config)


def test_mlx_lm_caches_the_lazy_engine_cannot_hold_are_refused_with_the_reason(tmp_path):
    model = tiny_model("llama", num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    tokens = random_prompt(100).tolist()
    quantized = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
    rotating = [RotatingKVCache(max_size=40) for _ in model.layers]
    for caches, message in [(rotating, "dropped its oldest tokens"), (quantized, "quantized KV")]:
        mlx_lm_prefill(model, tokens, caches)
        path = tmp_path / "other.safetensors"
        save_prompt_cache(str(path), caches, {})
        with pytest.raises(ValueError, match=message):
            load_lazy_cache(path, model)
    caches = make_prompt_cache(model)
    mlx_lm_prefill(model, tokens, caches)
    save_prompt_cache(str(path), caches[:3], {})
    with pytest.raises(ValueError, match="holds 3 layers but the model has"):
        load_lazy_cache(path, model)


def write_folder(folder):
    save_model(folder, tiny_model("llama"))
    save_config({**COMMON, **FAMILY_CONFIGS["llama"]}, folder / "config.json")
    hf = tiny_tokenizer()._tokenizer
    hf.chat_template = TEMPLATE
    hf.save_pretrained(folder)
    return folder


def test_generate_continues_a_file_of_mlx_lm_cache_prompt(tmp_path, capsys):
    folder = write_folder(tmp_path / "model")
    model, tokenizer = load(folder)
    # what mlx_lm.cache_prompt does: the document as an open user message, its metadata
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": DOCUMENT}],
                                           add_generation_prompt=False,
                                           continue_final_message=True)  # fmt: skip
    caches = make_prompt_cache(model)
    mlx_lm_prefill(model, prefix, caches)
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(str(path), caches, {"model": str(folder), "tokenizer_config": "{}"})
    whole = tokenizer.apply_chat_template([{"role": "user", "content": DOCUMENT + QUESTION}],
                                          add_generation_prompt=True)  # fmt: skip
    expected = [t for t, _ in mlx_generate_step(mx.array(whole), model, max_tokens=4)]
    for schedule in ("none", "off"):
        argv = ["generate", "--prompt-cache-file", str(path), "-p", QUESTION, "--json"]
        assert main([*argv, "--max-tokens", "4", "--schedule", schedule]) == 0
        report = json.loads(capsys.readouterr().out)
        (run,) = report["runs"].values()
        assert report["cached_tokens"] == len(prefix)
        assert run["tokens"] == expected[: len(run["tokens"])], schedule
    assert main([*argv, "--schedule", "paper"]) == 2
    assert "an mlx-lm prompt cache" in capsys.readouterr().err
