"""mlx-lm's prompt-cache files (`mlx_lm.cache_prompt`, `save_prompt_cache`) read by lazyllm-mlx.

Such a file holds every token's KV at every layer: a lazy cache that pruned nothing, so it becomes
a LazyCache with schedule "none" (the lazy engine, nothing pruned), or stays mlx-lm's list of
caches for plain mlx-lm (`--schedule off`). Only full KV caches qualify: a rotating cache that
dropped its oldest tokens (a sliding window, `--max-kv-size`) or a quantized one (`--kv-bits`) lacks
what the lazy engine keeps, and is refused with that reason. mlx-lm's files carry no checksum and
no model fingerprint: the layer count and KV shapes are checked against the model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, load_prompt_cache, make_prompt_cache

from .cache import LazyCache
from .config import LazyConfig
from .families import family_of

NOTHING_PRUNED = "none"


def read_mlx_lm_cache(path: str | Path, model: nn.Module) -> tuple[list[Any], dict[str, str]]:
    """mlx-lm's per-layer caches in `path` and their metadata, checked against `model`."""
    try:
        caches, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as error:  # noqa: BLE001  (mlx-lm's loader raises whatever it meets)
        raise ValueError(
            f"{path}: not a readable mlx-lm prompt cache ({type(error).__name__}: {error})"
        ) from None
    if len(caches) != len(model.layers):
        raise ValueError(
            f"{path} holds {len(caches)} layers but the model has {len(model.layers)}: it was "
            "saved with another model."
        )
    probe = make_prompt_cache(model)
    model(mx.array([[0]]), cache=probe)  # one token: the KV shapes and dtype the model makes
    offsets = set()
    for i, (cache, expected) in enumerate(zip(caches, probe)):
        _check_layer(path, i, cache, expected)
        offsets.add(cache.offset)
        dtype = expected.keys.dtype  # a file saved on a GPU may hold float16 KV
        cache.keys, cache.values = cache.keys.astype(dtype), cache.values.astype(dtype)
    if len(offsets) != 1 or 0 in offsets:
        raise ValueError(
            f"{path}: its layers hold {sorted(offsets)} tokens; expected one count > 0"
        )
    return caches, {k: v for k, v in metadata.items() if isinstance(v, str)}


def _check_layer(path: str | Path, i: int, cache: Any, expected: Any) -> None:
    kind = type(cache).__name__
    if isinstance(cache, RotatingKVCache):
        if cache.offset > cache.max_size:
            raise ValueError(
                f"{path}: layer {i} is a rotating cache that dropped its oldest tokens (mlx-lm's "
                "sliding window or --max-kv-size); the lazy engine needs every token's KV."
            )
    elif type(cache) is not KVCache:
        why = "quantized KV (--kv-bits)" if "Quantized" in kind else f"a {kind}, not a KV cache"
        raise ValueError(
            f"{path}: layer {i} holds {why}; the lazy engine keeps plain KV in the model's dtype."
        )
    keys, values, want = cache.keys, cache.values, expected.keys
    if not isinstance(keys, mx.array) or not isinstance(values, mx.array) or keys.ndim != 4:
        raise ValueError(f"{path}: layer {i} holds no usable keys and values")
    if values.shape[:3] != keys.shape[:3] or keys.shape[2] < cache.offset:
        raise ValueError(f"{path}: layer {i} holds keys and values that do not match")
    if keys.shape[0] != 1 or keys.shape[1] != want.shape[1] or keys.shape[3] != want.shape[3]:
        raise ValueError(
            f"{path}: layer {i} holds keys of shape {tuple(keys.shape)}, not the model's "
            f"(1, {want.shape[1]}, tokens, {want.shape[3]}): it was saved with another model."
        )


def as_lazy_cache(caches: list[Any], model: nn.Module) -> LazyCache:
    """A LazyCache with schedule "none" holding the KV of mlx-lm's (checked) caches."""
    offset = caches[0].offset
    state = {"stage0.positions": mx.arange(offset, dtype=mx.int32)}
    for j, layer in enumerate(caches):  # unrotated: the first `offset` entries, in order
        state[f"stage0.layer{j}.keys"] = layer.keys[..., :offset, :]
        state[f"stage0.layer{j}.values"] = layer.values[..., :offset, :]
    config = LazyConfig.preset(NOTHING_PRUNED).to_dict()
    meta_state = dict(config=config, offset=offset, sorted=[True])
    cache = LazyCache.from_state(state, meta_state, family_of(model).windows)
    mx.eval(cache.state)
    return cache
