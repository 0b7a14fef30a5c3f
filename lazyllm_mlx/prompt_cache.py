"""A lazy prompt cache on disk: save and load a LazyCache (document_cache.py continues a cached
document with a question).

A LazyCache (KV with positions per stage, aux caches, observation windows) is one safetensors file.
Its metadata has mlx-lm's `save_prompt_cache` layout (the user's metadata, the cache classes, the
scalars), with a cache class mlx-lm does not know: mlx-lm's `load_prompt_cache` then stops with a
KeyError that says what the file is and how to load it, and either tool tells the two apart.
`load_lazy_cache` also reads mlx-lm's own files (see `mlx_lm_prompt_cache`): a plain KV cache is
a lazy cache that pruned nothing. The file records the schedule, a fingerprint of the model and a
checksum of its contents, so a cache is never continued with another model or schedule, and a
damaged file is refused. Lookup maps are rebuilt from the stored positions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import LazyCache
from .config import LazyConfig
from .families import family_of
from .fingerprint import model_fingerprint
from .output_files import write_atomically
from .safetensors_file import check_safetensors

FORMAT = "lazyllm-mlx-cache/2"
# Our cache class in mlx-lm's layout: mlx-lm's loader fails to find it, saying this.
MLX_LM_MARK = (
    "LazyCache: a lazyllm-mlx prompt cache; load it with lazyllm_mlx.load_lazy_cache or "
    "`lazyllm-mlx generate --prompt-cache-file`"
)
_HEADER = "0.lazyllm"  # our header, among the user's metadata ("0.<key>")


def contents_checksum(arrays: dict[str, mx.array], header: dict[str, Any]) -> str:
    """SHA-256 of every array (name, dtype, shape, bytes) and of the header without it."""
    digest = hashlib.sha256()
    described = {k: v for k, v in header.items() if k != "checksum"}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(memoryview(array))
    return digest.hexdigest()


def save_lazy_cache(
    path: str | Path, cache: LazyCache, model: nn.Module, metadata: dict[str, str] | None = None
) -> None:
    """Write `cache` to `path` atomically (a failed save leaves any previous file intact).

    metadata: strings to keep with it (keys without dots, as mlx-lm's layout nests on them)."""
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if "." in k or k == "lazyllm" or not isinstance(v, str)]
    if bad:
        raise ValueError(f"Metadata keys {bad}: keys must be dot-free, not 'lazyllm'; values str.")
    arrays = cache.contents()
    arrays = {name: mx.contiguous(a) for name, a in arrays.items()}
    mx.eval(arrays)
    header = dict(format=FORMAT, model=model_fingerprint(model), **cache.meta_state)
    header["checksum"] = contents_checksum(arrays, header)
    layout = {f"0.{k}": v for k, v in metadata.items()}
    layout.update({_HEADER: json.dumps(header), "1.0": MLX_LM_MARK, "2.0": ""})
    # mx.save_safetensors appends ".safetensors" to a name without it
    save = lambda tmp: mx.save_safetensors(tmp, arrays, metadata=layout)  # noqa: E731
    write_atomically(path, save, suffix=".safetensors")


def read_file(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and metadata of a safetensors prompt-cache file; clear errors for the rest."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a prompt cache file.")
    if not path.is_file():
        raise FileNotFoundError(f"Prompt cache file not found: {path}")
    try:
        check_safetensors(path)  # before mlx reads it: header and extents make sense
        return mx.load(str(path), return_metadata=True)
    except Exception as error:  # mlx raises plain exceptions for unreadable files
        raise ValueError(f"{path} is not a readable prompt cache: {error}") from None


def file_kind(metadata: dict[str, str]) -> str:
    """ "lazyllm" (ours), "lazyllm/1" (ours, before checksums), "mlx-lm", or "unknown"."""
    if _HEADER in metadata and metadata.get("1.0") == MLX_LM_MARK:
        return "lazyllm"
    if "lazyllm" in metadata:
        return "lazyllm/1"
    if "1.0" in metadata and "2.0" in metadata:
        return "mlx-lm"
    return "unknown"


def read_cache_header(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """A lazyllm-mlx cache file's arrays and header (with its user metadata as "user"), checked
    against its checksum."""
    return checked_header(path, *read_file(path))


def checked_header(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str]
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """read_cache_header for a file read_file has read."""
    kind = file_kind(metadata)
    if kind == "lazyllm/1":
        raise ValueError(
            f"{path} was saved by an earlier lazyllm-mlx, without a checksum: cache the document "
            "again (lazyllm-mlx cache-prompt)."
        )
    if kind != "lazyllm":
        what = "an mlx-lm prompt cache" if kind == "mlx-lm" else "not a lazyllm-mlx prompt cache"
        raise ValueError(f"{path} is {what}.")
    try:
        header = json.loads(metadata[_HEADER])
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except ValueError as error:
        raise ValueError(f"{path}: corrupt prompt cache (header: {error})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown prompt cache format {header.get('format')!r}")
    if header.get("checksum") != contents_checksum(arrays, header):
        raise ValueError(
            f"{path}: corrupt prompt cache (its checksum does not match: the file was changed "
            "or damaged after it was saved)"
        )
    user = {k[2:]: v for k, v in metadata.items() if k.startswith("0.") and k != _HEADER}
    return arrays, {**header, "user": user}


def load_lazy_cache(
    path: str | Path, model: nn.Module, lazy: LazyConfig | None = None
) -> tuple[LazyCache, dict[str, str]]:
    """Read a cache saved by save_lazy_cache (or mlx-lm's save_prompt_cache: a cache with
    schedule "none") for `model`; returns it and the user metadata.

    `lazy`, when given, must be the schedule the cache was built with.
    """
    arrays, metadata = read_file(path)
    if file_kind(metadata) == "mlx-lm":
        return _from_mlx_lm(path, model, lazy)
    arrays, header = checked_header(path, arrays, metadata)
    if header["model"] != model_fingerprint(model):
        raise ValueError(f"{path} was saved with a different model than the one loaded.")
    config = LazyConfig.from_dict(header["config"])
    if lazy is not None and lazy.resolve(len(model.layers)) != config.resolve(len(model.layers)):
        raise ValueError(
            f"{path} was built with schedule {config.to_string()!r}, not {lazy.to_string()!r}."
        )
    try:
        cache = LazyCache.from_state(arrays, header, family_of(model).windows)
    except (KeyError, ValueError, IndexError) as error:
        raise ValueError(f"{path}: corrupt prompt cache ({error})") from None
    mx.eval(cache.state)
    return cache, header.get("user", {})


def _from_mlx_lm(
    path: str | Path, model: nn.Module, lazy: LazyConfig | None
) -> tuple[LazyCache, dict[str, str]]:
    from .mlx_lm_prompt_cache import as_lazy_cache, read_mlx_lm_cache

    layers = len(model.layers)
    none = LazyConfig.preset("none")
    if lazy is not None and lazy.resolve(layers) != none.resolve(layers):
        raise ValueError(
            f"{path} is an mlx-lm prompt cache: every token at every layer, a lazy cache that "
            f"pruned nothing (schedule 'none'). Continue it with --schedule none, or off (plain "
            f"mlx-lm), not {lazy.to_string()!r}."
        )
    caches, metadata = read_mlx_lm_cache(path, model)
    return as_lazy_cache(caches, model), metadata
