"""A short hash that tells loaded models apart: what a saved prompt cache, a stored calibration
and the eval's stored baselines are keyed by."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


def model_fingerprint(model: nn.Module, dtypes: bool = True) -> str:
    """A short hash of the model's architecture and a sample of its weights (and of their dtypes,
    unless `dtypes` is False: then the sample is rounded to bfloat16, so one model loaded as
    float32, float16 or bfloat16 hashes alike)."""
    known = getattr(model, "_lazyllm_fingerprints", None)
    if known is not None:  # a rank of a pipeline holds only some layers: taken before the split
        return known[dtypes]
    digest = hashlib.sha256()
    args = getattr(model, "args", None)
    described = vars(args) if args is not None else {}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, value in tree_flatten(model.parameters()):
        digest.update(f"{name}:{value.shape}:{value.dtype if dtypes else ''}".encode())
    layers = model.layers
    for module in (layers[0], layers[-1]):
        for _, value in tree_flatten(module.parameters())[:4]:
            sample = value.reshape(-1)[:64]
            sample = (sample if dtypes else sample.astype(mx.bfloat16)).astype(mx.float32)
            digest.update(np.array(sample).tobytes())
    return digest.hexdigest()[:16]
