"""GGUF on the GPU path: quantized tensors stay quantized (MLX affine, groups of 32), tested here
on the CPU by forcing the GPU dtype policy.

Stated tolerances, against the float32 model of the dequantized GGUF weights (logits of these
tiny models reach 3-4):
- the conversion: types on one affine grid per group (Q4_0, Q4_1, Q4_K at 4 bits; Q5_0, Q5_1, Q5_K,
  Q8_0 at 8 bits) give the same logits within 1e-4 in float32; the others (requantized at 8 bits)
  within 0.05;
- the GPU policy (float16 weights and activations): within 5 % of the largest logit, the most
  likely token the same at >= 90 % of the positions. (MLX's CPU kernels accumulate float16
  quantized matmuls in float16: most of that error is the CPU's, not the conversion's.)
"""

from __future__ import annotations

import lazyllm_mlx
from lazyllm_mlx import generate_step
from lazyllm_mlx.gguf.loader import load_gguf

import mlx.core as mx
import mlx.nn as nn
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_generate_step

PROMPT = mx.array([[5, 9, 12, 30, 7, 8, 21, 22, 23, 11, 6, 14]])
STEMS = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
STEMS += ("ffn_gate", "ffn_up", "ffn_down")


def every(qtype: Q, down: Q | None = None) -> dict[str, Q]:
    """Every matrix in `qtype`; ffn_down (256 wide, the only K-quant-sized rows) in `down`."""
    return {**dict.fromkeys(STEMS, qtype), "ffn_down": down or qtype}


def quantized_bits(model) -> dict[str, int]:
    return {name: m.bits for name, m in model.named_modules() if hasattr(m, "bits")}


def max_error(model, reference) -> tuple[float, float, float]:
    """(max |logit difference|, max |logit|, share of positions with the same top token)."""
    got, want = model(PROMPT).astype(mx.float32), reference(PROMPT)
    same = (got.argmax(-1) == want.argmax(-1)).astype(mx.float32).mean().item()
    return mx.abs(got - want).max().item(), mx.abs(want).max().item(), same


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize(
    ("types", "bits"),
    [
        (every(Q.Q4_0, Q.Q4_K), {Q.Q4_0: 4, Q.Q4_K: 4}),
        (every(Q.Q4_1, Q.Q5_K), {Q.Q4_1: 4, Q.Q5_K: 8}),
        (every(Q.Q5_0, Q.Q8_0), {Q.Q5_0: 8, Q.Q8_0: 8}),
        (every(Q.Q5_1), {Q.Q5_1: 8}),
    ],
    ids=["q4_0+q4_k", "q4_1+q5_k", "q5_0+q8_0", "q5_1"],
)
def test_types_on_one_grid_per_group_convert_exactly(tmp_path, arch, types, bits):
    tiny = write_tiny_gguf(tmp_path / "t.gguf", arch, types=types, n_layers=6 if arch == "gemma3"
                           else 2)  # fmt: skip
    model, _, config = load_gguf(tiny.path, mx.float32, quantized=True, return_config=True)
    layers = quantized_bits(model)
    assert layers and set(layers.values()) == set(bits.values())
    assert config["quantization"]["group_size"] == 32
    error, _, same = max_error(model, tiny.reference_model())
    assert error < 1e-4 and same == 1.0


@pytest.mark.parametrize("down", [Q.Q2_K, Q.Q3_K, Q.Q6_K])
def test_other_types_are_requantized_at_8_bits(tmp_path, down):
    tiny = write_tiny_gguf(tmp_path / "t.gguf", types=every(Q.Q8_0, down))
    model, _ = load_gguf(tiny.path, mx.float32, quantized=True)
    assert quantized_bits(model)["model.layers.0.mlp.down_proj"] == 8
    error, _, _ = max_error(model, tiny.reference_model())
    assert error < 0.05


def nbytes(model) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


@pytest.fixture
def gpu_policy(monkeypatch):
    """What load() does on a GPU (_platform.default_dtype: the stored dtype, not float32)."""
    monkeypatch.setattr(lazyllm_mlx.loading, "default_dtype", lambda stored=None: stored)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_the_gpu_policy_keeps_the_quantization_and_its_memory(tmp_path, gpu_policy, arch):
    tiny = write_tiny_gguf(tmp_path / "t.gguf", arch, types=every(Q.Q4_0, Q.Q4_K),
                           n_layers=6 if arch == "gemma3" else 2)  # fmt: skip
    model, _ = lazyllm_mlx.load(tiny.path)
    modules = dict(model.named_modules())
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], nn.QuantizedLinear)
    floats = {p.dtype for _, p in tree_flatten(model.parameters()) if p.dtype != mx.uint32}
    assert floats == {mx.float16}
    error, largest, same = max_error(model, tiny.reference_model())
    assert error < 0.05 * largest and same >= 0.9
    # Memory in proportion: 4 bits a weight, plus a float16 scale and bias per 32 weights.
    dense, _ = load_gguf(tiny.path, mx.float16, quantized=False)
    matrices = [p for n, p in tree_flatten(dense.parameters()) if p.ndim == 2]
    expected = nbytes(dense) - sum(p.nbytes for p in matrices)
    expected += sum(p.size * (4 + 2 * 16 / 32) // 8 for p in matrices)
    assert nbytes(model) == expected
    assert nbytes(model) / nbytes(dense) < 0.4


def test_the_cpu_policy_dequantizes_to_float32(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "t.gguf", types=every(Q.Q4_0, Q.Q4_K))
    model, _ = lazyllm_mlx.load(tiny.path)
    assert not quantized_bits(model)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}


def test_the_lazy_engine_runs_the_quantized_gguf_model_exactly(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "t.gguf", types=every(Q.Q8_0), n_layers=4)
    model, _ = load_gguf(tiny.path, mx.float32, quantized=True)
    prompt = mx.array([5, 9, 12, 30, 7, 8, 21, 22, 23, 11, 6, 14] * 8)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=8)]
    assert [t for t, _ in generate_step(prompt, model, lazy="none", max_tokens=8)] == expected
    assert len(list(generate_step(prompt, model, lazy="0.5:0.5", max_tokens=8))) == 8
