"""Linux CPU accommodations, kept in one place: OpenBLAS preload and the CPU dtype.

MLX's Linux CPU wheel bundles a reference BLAS (≈5 GFLOP/s fp32 on our machines). Loading OpenBLAS
with RTLD_GLOBAL *before* `mlx.core` is imported makes MLX's matmuls resolve to it (≈40× faster).
fp16/bf16/quantized matmuls stay slow on CPU whatever the BLAS, so CPU runs default to float32.
Nothing here does anything on macOS.
"""

from __future__ import annotations

import ctypes
import os
import sys

_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0")
_INSTALL_HINT = "apt-get install libopenblas0-pthread"
_warned: set[str] = set()
openblas_loaded = False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"[lazyllm-mlx] {message}", file=sys.stderr)


def preload_openblas() -> bool:
    """Load OpenBLAS globally on Linux before MLX is imported; say once on stderr if we can't."""
    global openblas_loaded
    if openblas_loaded or not sys.platform.startswith("linux"):
        return openblas_loaded
    if os.environ.get("LAZYLLM_MLX_NO_OPENBLAS"):
        return False
    if "mlx.core" in sys.modules:
        _warn_once(
            "late",
            "mlx was imported before lazyllm_mlx, so OpenBLAS could not be preloaded: CPU matmuls "
            "use MLX's reference BLAS (much slower). Import lazyllm_mlx first.",
        )
        return False
    for name in _OPENBLAS_NAMES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        openblas_loaded = True
        return True
    _warn_once(
        "missing",
        f"OpenBLAS not found: CPU matmuls use MLX's reference BLAS (≈40× slower). "
        f"Install it with: {_INSTALL_HINT}",
    )
    return False


def default_dtype(stored=None):
    """The dtype to run floating weights in: float32 on the CPU (other float types are slow
    there), else `stored` (None: keep the weights' dtype)."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else stored


def warn_if_quantized_on_cpu(model) -> None:
    """Say once that quantized weights are the slow path on the CPU (the fast one on a Mac)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    if any(hasattr(module, "bits") for _, module in model.named_modules()):
        _warn_once(
            "quantized",
            "this model's weights are quantized: on the CPU quantized matmuls run several times "
            "slower than float32 (benchmarks/cross-model/cpu_matmul_dtypes.json; on a Mac they are "
            "the fast path); for speed here, use the unquantized model or its GGUF file, which "
            "loads as float32.",
        )
