"""A lazy prompt cache on disk: save and load a LazyCache, and continue a cached document.

A LazyCache (KV with positions per stage, aux caches, observation windows) is one safetensors file.
Its metadata has mlx-lm's `save_prompt_cache` layout (the user's metadata, the cache classes, the
scalars), with a cache class mlx-lm does not know: mlx-lm's `load_prompt_cache` then stops with a
KeyError that says what the file is and how to load it, and either tool tells the two apart.
`load_lazy_cache` also reads mlx-lm's own files (see `mlx_lm_prompt_cache`): a plain KV cache is
a lazy cache that pruned nothing. The file records the schedule, a fingerprint of the model and a
checksum of its contents, so a cache is never continued with another model or schedule, and a
damaged file is refused. Lookup maps are rebuilt from the stored positions.

A cached document follows mlx-lm's convention: the document is the start of a user message (chat
template applied with `continue_final_message`, so the message stays open), and a later prompt Q
continues that message with Q, then the template's end of turn and generation prompt. Only Q and
that tail are prefilled; pruned document tokens the question needs are revived from the aux caches.
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
from .generate import encode_prompt
from .output_files import write_atomically
from .safetensors_file import check_safetensors

FORMAT = "lazyllm-mlx-cache/2"
QUERY_MARK = "<query>"
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
    return _checked_header(path, *read_file(path))


def _checked_header(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str]
) -> tuple[dict[str, mx.array], dict[str, Any]]:
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
    arrays, header = _checked_header(path, arrays, metadata)
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


def _messages(system_prompt: str | None, content: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*system, {"role": "user", "content": content}]


def document_tokens(
    tokenizer: Any, text: str, system_prompt: str | None, template: dict[str, Any] | None
) -> tuple[str, list[int]]:
    """The cached prefix, as text and tokens: an open user message starting with `text`.

    template: apply_chat_template arguments, or None to use no chat template.
    """
    if template is None:
        return text, encode_prompt(tokenizer, text)
    prefix = tokenizer.apply_chat_template(
        _messages(system_prompt, text),
        tokenize=False,
        add_generation_prompt=False,
        continue_final_message=True,
        **template,
    )
    return prefix, tokenizer.encode(prefix, add_special_tokens=False)


def query_tokens(
    tokenizer: Any, text: str, system_prompt: str | None, template: dict[str, Any] | None
) -> list[int]:
    """What follows the cached prefix: `text`, the end of the user turn, the generation prompt."""
    if template is not None:
        messages = _messages(system_prompt, text)
        full = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template
        )
        messages[-1]["content"] = QUERY_MARK
        marked = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template
        )
        text = full[marked.index(QUERY_MARK) :]  # mlx-lm's rule: everything from the content on
    return tokenizer.encode(text, add_special_tokens=False)


def save_document_cache(
    path: str | Path,
    cache: LazyCache,
    model: nn.Module,
    *,
    model_source: str | None,
    prefix: str,
    template: dict[str, Any] | None,
    system_prompt: str | None,
) -> None:
    """Save the cache of a prefilled document with what continuing it needs: how to find the
    model again (`model_source` as given to `load`, None for the default model), the prefix text,
    the chat template arguments (None: no template) and the system prompt."""
    metadata = {
        "model": _model_reference(model_source),
        "schedule": cache.config.to_string(),
        "chat_template_args": json.dumps(template),  # "null": no chat template
        "system_prompt": json.dumps(system_prompt),
        "prefix": prefix,
        "prefix_tokens": str(cache.offset),
    }
    save_lazy_cache(path, cache, model, metadata)


def _model_reference(model: str | None) -> str:
    """How a later `generate` finds the model again: an absolute path, a hub id, or '' (default)."""
    if model is None:
        return ""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def check_plain(path: str | Path, plain: bool) -> bool:
    """Whether `path` is an mlx-lm file; ValueError when plain mlx-lm is asked to continue ours."""
    foreign = file_kind(read_file(path)[1]) == "mlx-lm"
    if plain and not foreign:
        raise ValueError(
            f"{path} holds LazyLLM state: plain mlx-lm (--schedule off) cannot continue it."
        )
    return foreign


def cached_model(path: str | Path) -> str | None:
    """The model a saved document names, as `load` takes it (None: the default model); mlx-lm's
    files name it too."""
    arrays, metadata = read_file(path)
    if file_kind(metadata) == "mlx-lm":
        return metadata.get("0.model") or None
    return _checked_header(path, arrays, metadata)[1].get("user", {}).get("model") or None


def continue_from_file(
    path: str | Path,
    model: nn.Module,
    tokenizer: Any,
    text: str,
    lazy: LazyConfig | None = None,
    *,
    system_prompt: str | None = None,
    chat_template: bool = True,
    plain: bool = False,
) -> tuple[LazyConfig | None, list[int], Any]:
    """Continue a document saved by save_document_cache (or mlx-lm's cache_prompt) with `text`:
    the schedule to run (`lazy`, default the file's), the tokens to prefill and the loaded cache.

    system_prompt: must be the file's when given. chat_template=False continues without the chat
    template. plain: continue with plain mlx-lm (schedule None), which only an mlx-lm file can.
    Mismatched models or schedules and unreadable files raise ValueError / FileNotFoundError with
    a clear message.
    """
    foreign = check_plain(path, plain)
    if plain:
        from .mlx_lm_prompt_cache import read_mlx_lm_cache

        cache, metadata = read_mlx_lm_cache(path, model)
    else:
        cache, metadata = load_lazy_cache(path, model, lazy)
    if foreign:  # mlx-lm's cache_prompt: the tokenizer's template with no options, no system
        template = {} if tokenizer.has_chat_template else None
        stored_system_prompt = None
    else:
        if str(cache.offset) != metadata.get("prefix_tokens", str(cache.offset)):
            raise ValueError(f"{path}: corrupt prompt cache (its token count does not match)")
        template = json.loads(metadata.get("chat_template_args", "null"))
        stored_system_prompt = json.loads(metadata.get("system_prompt", "null"))
    if system_prompt is not None and system_prompt != stored_system_prompt:
        raise ValueError(
            f"{path} was built with system prompt {stored_system_prompt!r}; it cannot change."
        )
    if not chat_template:
        template = None
    tokens = query_tokens(tokenizer, text, stored_system_prompt, template)
    if plain:
        return None, tokens, cache
    lazy = lazy if lazy is not None else cache.config  # its options (norevive, min=) may differ
    return lazy, tokens, cache
