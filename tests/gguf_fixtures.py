"""Tiny GGUF files written the way llama.cpp's converter writes them, for loader tests.

Weights are random, in HF layout first; the GGUF gets llama.cpp's transforms (llama q/k row
permutation, Gemma norms stored as w+1). The reference weights are what an exact loader must give
back: each HF tensor quantized and dequantized (rows are quantized independently, so permuting
rows commutes with quantization).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lazyllm_mlx  # noqa: F401  (OpenBLAS before mlx)
from lazyllm_mlx._mlx_lm_private import model_from_config

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 256
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
MODEL_TYPES["phi3"] = "phi3"

# HF module path -> llama.cpp tensor stem (the naming llama.cpp's converter uses)
_STEMS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA_STEMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Byte offsets of the float16 scale fields inside one 256-value K-quant block.
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

BPE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ċ", "!", ".", "1", "2", "12"]
BPE_TOKENS += [chr(c) for c in range(ord("a"), ord("z") + 1)]
BPE_TOKENS += ["he", "the", "Ġc", "at", "Ġcat", "Ġthe"]
BPE_MERGES = ["h e", "t he", "Ġ c", "a t", "Ġc at", "Ġ the", "1 2"]
SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_TOKENS += ["\n", "\n\n", "  ", "   ", "<0x21>", "<0x0A>", "\u2581"]
SPM_TOKENS += [chr(c) for c in range(ord("a"), ord("z") + 1)]
SPM_TOKENS += ["he", "the", "\u2581c", "at", "\u2581cat", "\u2581the"]
SPM_TYPES = [3, 3, 3, 2, 3, 3, 4, 4, 4, 4, 6, 6] + [1] * (len(SPM_TOKENS) - 12)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyGGUF:
    path: Path
    config: dict  # the mlx-lm config the loader should derive
    reference: dict[str, np.ndarray]  # mlx-lm parameter name -> weights an exact loader returns

    def reference_model(self, **overrides):
        config = {**self.config, **overrides}
        model = model_from_config(config)
        weights = {k: mx.array(v) for k, v in self.reference.items()}
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        return model


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head reordered for its interleaved RoPE."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def family_config(arch: str, n_layers: int, vocab: int, tie: bool) -> dict:
    config = {
        "model_type": MODEL_TYPES[arch],
        "hidden_size": HIDDEN,
        "num_hidden_layers": n_layers,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
    }
    if arch == "gemma3":
        config.update(sliding_window=4, sliding_window_pattern=6, query_pre_attn_scalar=HEAD_DIM)
        config.update(rope_local_base_freq=10000.0)
    return config


def _random_k_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _K_SCALES[qtype]:
        data[..., offset : offset + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def _encode(rng, w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or array to store, its exact dequantized values)."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype in _K_SCALES:
        data = _random_k_blocks(rng, qtype, *w.shape)
    else:
        data = quantize(w, qtype)
    return data, dequantize(data, qtype).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    types: dict[str, Q] | None = None,
    tie: bool = False,
    n_layers: int = 2,
    seed: int = 0,
    tokenizer: str | None = None,
    file_arch: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
    skip: tuple[str, ...] = (),
) -> TinyGGUF:
    """Write a tiny `arch` GGUF. `types` maps llama.cpp stems (e.g. "attn_q") to tensor types
    (2-D tensors default to F32; 1-D tensors are always F32, as llama.cpp writes them)."""
    rng = np.random.default_rng(seed)
    tokenizer = tokenizer or ("llama" if arch == "gemma3" else "gpt2")
    tokens = SPM_TOKENS if tokenizer == "llama" else BPE_TOKENS
    config = family_config(arch, n_layers, len(tokens), tie)
    shapes = {k: v.shape for k, v in tree_flatten(model_from_config(config).parameters())}
    if tie:
        shapes.pop("lm_head.weight", None)
    else:
        shapes["lm_head.weight"] = (len(tokens), HIDDEN)

    writer = gguf.GGUFWriter(str(path), file_arch or arch)
    _write_metadata(writer, arch, config, tokenizer, tokens)
    if extra_metadata:
        extra_metadata(writer)
    reference = {}
    for name, shape in shapes.items():
        module, _, suffix = name.rpartition(".")
        layer, stem = _gguf_stem(arch, module)
        w = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if name.endswith("norm.weight"):
            w = (0.1 * rng.standard_normal(shape) + (0.0 if arch == "gemma3" else 1.0)).astype(
                np.float32
            )
        qtype = (types or {}).get(stem, Q.F32) if len(shape) == 2 else Q.F32
        stored, reference[name] = _encode(rng, w, qtype)
        if qtype in _K_SCALES:  # random blocks: the stored values are the truth
            w = reference[name]
        if arch == "llama" and stem in ("attn_q", "attn_k"):
            heads = HEADS if stem == "attn_q" else KV_HEADS
            stored = _encode(rng, llama_permute(w, heads), qtype)[0]
        if arch == "gemma3" and name.endswith("norm.weight"):
            stored = w + 1.0
        gguf_name = f"{stem}.{suffix}" if layer is None else f"blk.{layer}.{stem}.{suffix}"
        raw = None if qtype in (Q.F32, Q.F16) else qtype
        if gguf_name in skip:
            continue
        writer.add_tensor(gguf_name, stored, raw_dtype=raw)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(Path(path), config, reference)


def _gguf_stem(arch: str, module: str) -> tuple[str | None, str]:
    if module.startswith("model.layers."):
        layer, _, rest = module[len("model.layers.") :].partition(".")
        stems = {**_STEMS, **_GEMMA_STEMS} if arch == "gemma3" else _STEMS
        return layer, stems[rest]
    return None, _STEMS[module]


def _write_metadata(
    writer: gguf.GGUFWriter, arch: str, config: dict, kind: str, tokens: list
) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(HEAD_DIM)
    if arch in ("qwen3", "gemma3"):
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    if kind == "gpt2":
        writer.add_tokenizer_pre("smollm")
        writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
        writer.add_token_merges(BPE_MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    else:
        writer.add_token_types(SPM_TYPES)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
