"""Load a llama.cpp GGUF file as an unmodified mlx-lm model plus its tokenizer.

Tensors are read by `.reader` and dequantized with gguf-py's `gguf.quants`. llama.cpp stores
llama q/k weights permuted for its interleaved RoPE and Gemma norms as w+1: both are undone, so
mlx-lm's own classes run unchanged. In float32 (the CPU path) every tensor is dequantized; in
float16 or bfloat16 (the GPU path) quantized tensors stay quantized, as MLX affine weights
(`.quantized`), and the config records them under "quantization" as mlx-lm's does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType

from .._mlx_lm_private import model_from_config
from .._platform import default_dtype
from . import load_cache
from .quantized import GROUP_SIZE, mlx_bits, quantize_tensor
from .reader import SUPPORTED_TENSOR_TYPES, GGUFHeader, TensorInfo, read_header, read_tensor

# llama.cpp architecture -> (mlx-lm model_type, per-architecture tensor name overrides)
ARCHITECTURES: dict[str, tuple[str, dict[str, str]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3_text", {"ffn_norm": "pre_feedforward_layernorm"}),
    "phi3": ("phi3", {"ffn_up": "mlp.gate_up_proj"}),
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# GGUF weights are dequantized to this float type unless asked for another (CPU runs: float32).
GGUF_DEFAULT_DTYPE = "float16"
# Tensors that carry RoPE parameters rather than weights; read into the config.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation (rows of each head interleaved for its RoPE)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, overrides: dict[str, str]) -> str | None:
    """mlx-lm parameter name for a llama.cpp tensor name, or None if unknown."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    target = overrides.get(parts[2]) or _BLOCK_NAMES.get(parts[2])
    return f"model.layers.{parts[1]}.{target}.{suffix}" if target else None


def _weight_fixer(arch: str, config: dict) -> Callable[[str, np.ndarray], np.ndarray]:
    def fix(name: str, w: np.ndarray) -> np.ndarray:
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            return _unpermute(w, config["num_attention_heads"])
        if arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            return _unpermute(w, config["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            return w.astype(np.float32) - 1.0  # llama.cpp stores w+1; mlx-lm computes 1 + w
        return w

    return fix


_MISSING = object()


def _getter(header: GGUFHeader, arch: str) -> Callable[..., Any]:
    def get(key: str, default: Any = _MISSING) -> Any:
        full = f"{arch}.{key}"
        if full not in header.metadata:
            if default is _MISSING:
                raise ValueError(f"{header.path}: GGUF metadata lacks {full!r}")
            return default
        value = header.metadata[full]
        if isinstance(value, np.ndarray):  # per-layer values: only uniform ones fit mlx-lm
            if value.size == 0 or (value != value.flat[0]).any():
                raise ValueError(f"{header.path}: per-layer {full!r} values are not supported")
            value = value.flat[0].item()
        return value

    return get


def gguf_to_config(header: GGUFHeader, read: Callable[[TensorInfo], np.ndarray]) -> dict:
    """mlx-lm config dict (HF key names) from the GGUF metadata; `read` loads a small tensor."""
    arch = header.metadata["general.architecture"]
    model_type = ARCHITECTURES[arch][0]
    get, tensors = _getter(header, arch), header.tensors
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{header.path}: GGUF file has no token_embd.weight tensor")
    hidden, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_heads)
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rope_dim = get("rope.dimension_count", head_dim)
    if model_type in ("qwen2", "phi3") and head_dim * n_heads != hidden:
        raise ValueError(f"{header.path}: {arch} with head_dim {head_dim} is not supported")
    if model_type == "phi3":
        config["partial_rotary_factor"] = rope_dim / head_dim
    elif rope_dim != head_dim:
        raise ValueError(f"{header.path}: partial RoPE ({rope_dim}/{head_dim}) unsupported")
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if model_type == "gemma3_text":
        config.update(_gemma3_config(header, get, config))
    scaling = _rope_scaling(header, get, read, config, rope_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    _check_config(header, config)
    return config


_SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
_SIZES += ("num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _check_config(header: GGUFHeader, config: dict) -> None:
    """Metadata that cannot describe the file's tensors is corrupt: refused before a model of
    that size is built."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{header.path}: corrupt GGUF metadata ({what})")

    for key in _SIZES:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise bad(f"{key} = {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = config[key]
        if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise bad(f"{key} = {value!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise bad(f"{config['num_attention_heads']} heads share {config['num_key_value_heads']}")
    blocks = {int(n.split(".")[1]) for n in header.tensors if n.startswith("blk.")}
    if blocks != set(range(config["num_hidden_layers"])):
        raise bad(f"block_count {config['num_hidden_layers']}, tensors for {len(blocks)} blocks")
    if header.tensors["token_embd.weight"].shape[1] != config["hidden_size"]:
        raise bad(f"embedding_length {config['hidden_size']} does not fit token_embd.weight")


def _gemma3_config(header: GGUFHeader, get: Callable[..., Any], config: dict) -> dict:
    scalar = config["head_dim"]
    if scale := get("attention.scale", None):
        scalar = scale**-2
    elif config["num_hidden_layers"] == 62:  # llama.cpp's rule: 27B scales by hidden/heads
        scalar = config["hidden_size"] // config["num_attention_heads"]
    pattern = header.metadata.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, np.ndarray):  # newer files: one "is sliding" flag per layer
        flags = [bool(x) for x in pattern]
        pattern = flags.index(False) + 1 if False in flags else len(flags) + 1
        if any(flags[i] != ((i + 1) % pattern != 0) for i in range(len(flags))):
            raise ValueError(f"{header.path}: irregular sliding-window layers are not supported")
    return {
        "query_pre_attn_scalar": scalar,
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": pattern,
        "rope_local_base_freq": get("rope.freq_base_swa", 10000.0),
    }


def _rope_scaling(header, get, read, config: dict, rope_dim: int) -> dict | None:
    kind = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None)
    original = get("rope.scaling.original_context_length", None)
    tensors = header.tensors
    if "rope_factors_long.weight" in tensors:  # phi3 longrope: factors stored as tensors
        config["original_max_position_embeddings"] = original or config["max_position_embeddings"]
        return {
            "type": "longrope",
            "long_factor": read(tensors["rope_factors_long.weight"]).tolist(),
            "short_factor": read(tensors["rope_factors_short.weight"]).tolist(),
        }
    if "rope_freqs.weight" in tensors:  # llama 3.x: llama.cpp bakes rope_scaling into factors
        return _llama3_scaling(
            header, read(tensors["rope_freqs.weight"]), config, rope_dim, original
        )
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind == "yarn":
        yarn = {"rope_type": "yarn", "factor": float(factor)}
        yarn["original_max_position_embeddings"] = original or config["max_position_embeddings"]
        for key in ("beta_fast", "beta_slow"):
            if (value := get(f"rope.scaling.yarn_{key}", None)) is not None:
                yarn[key] = value
        return yarn
    raise ValueError(f"{header.path}: RoPE scaling {kind!r} is not supported")


def llama3_rope_factors(scaling: dict, base: float, dims: int) -> np.ndarray:
    """Per-frequency divisors of HF's "llama3" RoPE scaling, as llama.cpp stores them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama3_scaling(header, factors, config: dict, dims: int, original: int | None) -> dict:
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original or 8192,
    }
    expected = llama3_rope_factors(scaling, config["rope_theta"], dims)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(f"{header.path}: rope_freqs.weight does not match llama3 RoPE scaling")
    return scaling


def _progress(total: int, label: str, show: bool | None):
    if show is None:
        show = sys.stderr.isatty()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="tensor", disable=not show, leave=False)


def load_gguf(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    *,
    model_config: dict | None = None,
    tokenizer_config: dict | None = None,
    progress: bool | None = None,
    return_config: bool = False,
    quantized: bool | None = None,
    cache: bool | None = None,
) -> tuple:
    """Load a GGUF file as `(model, tokenizer)` (plus the config with return_config), like
    `mlx_lm.load`. Floating weights are in `dtype` (default: float32 on CPU, else float16).
    quantized: keep quantized tensors quantized (MLX affine, see `.quantized`); default: unless
    `dtype` is float32. cache: keep the loaded weights in the user's cache folder and read them
    from there next time (see `.load_cache`; default: unless LAZYLLM_MLX_GGUF_CACHE=0).
    `progress` shows a progress bar on stderr (default: when stderr is a terminal)."""
    from .tokenizer import build_tokenizer

    header = read_header(path)
    arch = header.metadata.get("general.architecture")
    names = _weight_names(header, arch)
    data = np.memmap(header.path, np.uint8, mode="r")
    try:
        config = gguf_to_config(header, lambda info: read_tensor(data, info))
    except (TypeError, ArithmeticError) as error:  # values of the wrong type, a zero head count
        raise ValueError(f"{header.path}: corrupt GGUF metadata ({error})") from None
    config.update(model_config or {})
    try:
        tokenizer = build_tokenizer(header.metadata, header.path, tokenizer_config)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001  (tokenizers raises bare Exceptions for bad vocabularies)
        raise ValueError(f"{header.path}: its tokenizer cannot be built ({error})") from None
    fix = _weight_fixer(arch, config)
    dtype = dtype or default_dtype(getattr(mx, GGUF_DEFAULT_DTYPE))
    keep = dtype != mx.float32 if quantized is None else quantized
    bits = {
        name: mlx_bits(header.tensors[name]) if keep and target.endswith(".weight") else None
        for name, target in names.items()
    }
    quantization = {
        names[name].removesuffix(".weight"): {"group_size": GROUP_SIZE, "bits": b}
        for name, b in bits.items()
        if b is not None
    }
    if quantization:
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4, **quantization}
    cached = load_cache.enabled() if cache is None else cache
    options = dict(dtype=str(dtype), quantized=keep, model_config=model_config or {})
    weights = load_cache.load(header.path, options) if cached else None
    if weights is None:
        weights = {}
        with _progress(len(names), f"Loading {header.path.name}", progress) as bar:
            for name, target in names.items():
                weights.update(_tensor(data, header.tensors[name], target, bits[name], fix, dtype))
                mx.eval(weights)  # one tensor at a time, to bound memory
                bar.update()
        if cached:
            load_cache.save(header.path, options, weights)
    model = _build_model(header.path, config, weights)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _tensor(data, info: TensorInfo, target: str, bits: int | None, fix, dtype) -> dict:
    """One GGUF tensor as mlx-lm parameters: dense in `dtype`, or quantized (weight, scales,
    biases) when `bits` is set."""
    dense = read_tensor(data, info)
    if bits is None:
        return {target: mx.array(fix(info.name, dense), dtype)}
    stem = target.removesuffix(".weight")
    packed, scales, biases = quantize_tensor(data, info, dense, dtype)
    return {
        target: mx.array(fix(info.name, packed)),
        f"{stem}.scales": mx.array(fix(info.name, scales), dtype),
        f"{stem}.biases": mx.array(fix(info.name, biases), dtype),
    }


def _weight_names(header: GGUFHeader, arch: Any) -> dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, after checking architecture and tensor types."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{header.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    names = {}
    for info in header.tensors.values():
        if info.name in _ROPE_TENSORS:
            continue
        if GGMLQuantizationType(info.type_id) not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
            raise ValueError(
                f"{header.path}: tensor {info.name!r} has type {info.type_name}, which this "
                f"loader cannot dequantize (supported: {supported})"
            )
        if (target := hf_name(info.name, ARCHITECTURES[arch][1])) is None:
            raise ValueError(f"{header.path}: unexpected tensor {info.name!r} for {arch!r}")
        names[info.name] = target
    return names


def _build_model(path: Path, config: dict, weights: dict[str, mx.array]) -> Any:
    """An mlx-lm model of config's family holding exactly `weights`."""
    from mlx.utils import tree_flatten

    model = model_from_config(config)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization")
    if quantization:
        import mlx.nn as nn

        nn.quantize(model, class_predicate=lambda p, _: quantization.get(p, False))
    expected = {k for k, _ in tree_flatten(model.parameters())}
    if missing := sorted(expected - weights.keys()):
        raise ValueError(f"{path}: GGUF file lacks tensors for {', '.join(missing[:8])}")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(
            f"{path}: tensors do not fit the {config['model_type']} model: {e}"
        ) from None
    model.eval()
    return model
