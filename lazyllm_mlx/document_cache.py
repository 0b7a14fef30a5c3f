"""A cached document and its continuation, mlx-lm's way: the document is the start of a user
message (chat template applied with `continue_final_message`, so the message stays open), and a
later prompt Q continues that message with Q, then the template's end of turn and generation
prompt. Only Q and that tail are prefilled; pruned document tokens the question needs are
revived from the aux caches. The file keeps, beside the cache (prompt_cache.py), how to find the
model again, the chat template arguments, the system prompt and the prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .cache import LazyCache
from .config import LazyConfig
from .generate import encode_prompt
from .prompt_cache import checked_header, file_kind, load_lazy_cache, read_file, save_lazy_cache

QUERY_MARK = "<query>"


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
    adapter_path: str | None = None,
    eos_tokens: list[str] | None = None,
) -> None:
    """Save the cache of a prefilled document with what continuing it needs: how to find the
    model again (`model_source` as given to `load`, None for the default model; the adapter it
    was loaded with), the prefix text, the chat template arguments (None: no template), the
    system prompt and the extra tokens that end a generation."""
    metadata = {
        "model": _model_reference(model_source),
        "adapter_path": _model_reference(adapter_path),
        "eos_tokens": json.dumps(list(eos_tokens or [])),
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


@dataclass(frozen=True)
class SavedLoading:
    """How a saved document's model was loaded: what a later `generate` loads by default."""

    model: str | None  # as `load` takes it; None: the default model
    adapter_path: str | None
    eos_tokens: list[str]


def cached_loading(path: str | Path) -> SavedLoading:
    """The model, adapter and end tokens a saved document was built with; mlx-lm's cache_prompt
    files keep the model and its --eos-token too."""
    arrays, metadata = read_file(path)
    if file_kind(metadata) == "mlx-lm":
        user = {k[2:]: v for k, v in metadata.items() if k.startswith("0.")}
        eos = json.loads(user.get("tokenizer_config") or "{}").get("eos_token")
        return SavedLoading(user.get("model") or None, None, [eos] if eos else [])
    user = checked_header(path, arrays, metadata)[1].get("user", {})
    return SavedLoading(
        user.get("model") or None,
        user.get("adapter_path") or None,
        json.loads(user.get("eos_tokens") or "[]"),
    )


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
