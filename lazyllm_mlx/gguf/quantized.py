"""GGUF quantized tensors as MLX affine-quantized weights: (weight, scales, biases), groups of 32.

On a GPU a GGUF model stays quantized, as mlx-lm's own GGUF path keeps Q4_0/Q4_1/Q8_0: a 7B
Q4_K_M then needs ~5 GB instead of ~14 GB dequantized to float16. Each llama.cpp type maps to 4-
or 8-bit affine quantization with groups of 32 (MLX's smallest, the closest to llama.cpp's blocks
and sub-blocks of 16-32):

- exact (up to the float16 rounding of each group's scale and bias): Q4_0, Q4_1 and Q4_K at 4
  bits, Q5_0, Q5_1, Q5_K and Q8_0 at 8 bits, whose values already lie on one affine grid per
  32-value group: the codes are recovered from the dequantized values, the grid is read from the
  block headers;
- the others (Q2_K, Q3_K and Q6_K, whose sub-blocks of 16 have scales of their own; IQ4_NL, IQ4_XS
  and MXFP4, non-uniform grids) at 8 bits, by `mx.quantize` of their dequantized values: an
  error under 1/500 of each group's range, far below the source's own. (At 4 bits their grids do
  not fit MLX's: the error would rival the source's.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from .reader import TensorInfo

Q = GGMLQuantizationType
GROUP_SIZE = 32
_EXACT = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q8_0": 8}
_REQUANTIZED = ("Q2_K", "Q3_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4")
BITS = {**_EXACT, **dict.fromkeys(_REQUANTIZED, 8)}


def mlx_bits(info: TensorInfo) -> int | None:
    """Bits of the MLX quantization a GGUF tensor keeps; None: a float tensor (or 1-D)."""
    if len(info.dims) != 2 or info.dims[0] % GROUP_SIZE:
        return None
    return BITS.get(info.type_name)


def quantize_tensor(
    data: np.ndarray, info: TensorInfo, dense: np.ndarray, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 weight, scales, biases) of a GGUF tensor, in HF shape, scales in `dtype`.

    data: the file's bytes; dense: the tensor dequantized (float32, HF shape)."""
    bits = BITS[info.type_name]
    if info.type_name not in _EXACT:
        weight, scales, biases = mx.quantize(mx.array(dense, dtype), GROUP_SIZE, bits)
        return np.array(weight), _as(scales, dtype), _as(biases, dtype)
    scale, bias = _grid(data, info)
    shape = (dense.shape[0], dense.shape[1] // GROUP_SIZE)
    scale, bias = scale.reshape(shape), bias.reshape(shape)
    groups = dense.reshape(*shape, GROUP_SIZE)
    safe = np.where(scale == 0, 1, scale)[..., None]
    codes = np.rint((groups - bias[..., None]) / safe).clip(0, (1 << bits) - 1)
    codes = np.where(scale[..., None] == 0, 0, codes).reshape(dense.shape)
    return _pack(codes.astype(np.uint32), bits), _as(scale, dtype), _as(bias, dtype)


def _grid(data: np.ndarray, info: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
    """Each 32-value group's scale and bias (float32), in file order, from the block headers."""
    block_bytes = GGML_QUANT_SIZES[Q(info.type_id)][1]
    blocks = data[info.offset : info.offset + info.n_bytes].reshape(-1, block_bytes)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    offsets = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}  # d * (q - offset), q unsigned
    if info.type_name in offsets:
        return d, -offsets[info.type_name] * d
    second = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    if info.type_name in ("Q4_1", "Q5_1"):  # d * q + m
        return d, second
    # Q4_K, Q5_K: (d * sc) * q - dmin * m per sub-block of 32, scales packed alike
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d[:, None] * sc.astype(np.float32)
    return scale.reshape(-1), -(second[:, None] * m.astype(np.float32)).reshape(-1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's layout: 32 // bits codes per uint32, the first in the lowest bits."""
    per = 32 // bits
    grouped = codes.reshape(codes.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint32)


def _as(values: np.ndarray | mx.array, dtype: mx.Dtype) -> np.ndarray:
    """Scales or biases rounded to `dtype`, kept as float32 numpy (exact in it)."""
    return np.array(mx.array(values).astype(dtype).astype(mx.float32))
