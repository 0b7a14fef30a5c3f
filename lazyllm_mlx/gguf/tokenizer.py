"""The tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata), built with `tokenizers`.

Two kinds: byte-level BPE (`gpt2`: vocabulary + merges + a pre-tokenizer named by `ggml.pre`) and
SentencePiece-style BPE (`llama`: vocabulary + scores, byte fallback; merges rebuilt from scores).
The result is a `PreTrainedTokenizerFast` in mlx-lm's `TokenizerWrapper`, as `mlx_lm.load` returns.

Why not transformers' own GGUF converter (`transformers.integrations.gguf`): it has no pre-tokenizer
step for `ggml.pre` = "smollm" (digits split one by one before the byte-level step), so on
SmolLM2, our default model, it tokenizes differently from HF's tokenizer.json and from llama.cpp
(e.g. a newline-space run before a digit). Built here, each `ggml.pre` we know gets the split
of its reference tokenizer.
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre
from transformers import PreTrainedTokenizerFast

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_SPACE = "\u2581"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp `tokenizer.ggml.pre` -> regex split applied before the byte-level mapping
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_DIGIT_SPLIT = ("smollm", "starcoder", "refact")  # GPT-2 regex after isolating every digit
_GPT2_SPLIT = ("gpt2", "default", "mpt", "olmo")
# Token texts llama.cpp treats as end-of-generation whatever the file's eos id says.
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _byte_level(tokens: list[str], merges: list[str], pre_type: str | None) -> Tokenizer:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_type in _PRE_SPLITS:
        split = pre.Split(Regex(_PRE_SPLITS[pre_type]), behavior="isolated")
        tok.pre_tokenizer = pre.Sequence(
            [split, pre.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif pre_type in _DIGIT_SPLIT:
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), byte_level])
    else:
        if pre_type not in _GPT2_SPLIT:
            warnings.warn(
                f"GGUF pre-tokenizer {pre_type!r} is unknown here; using GPT-2's split, "
                "token ids may differ from the reference tokenizer",
                stacklevel=3,
            )
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict[str, int], mergeable: set[str], rank: dict[str, float]) -> list:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    best piece first (SentencePiece merges the pair whose result scores highest)."""
    found, lookup, names = [], vocab.get, {i: t for t, i in vocab.items()}
    for piece in mergeable:
        for i in range(1, len(piece)):
            left, right = lookup(piece[:i]), lookup(piece[i:])
            if left is not None and right is not None:
                found.append((-rank[piece], left, right))
    found.sort()
    return [(names[left], names[right]) for _, left, right in found]


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    scores = meta.get("tokenizer.ggml.scores")
    rank = {t: (-i if scores is None else float(scores[i])) for i, t in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types) if ty in (_NORMAL, _USER_DEFINED) and len(t) > 1}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab,
            _spm_merges(vocab, mergeable, rank),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", _SPACE)
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPACE), replace]) if prefix else replace
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _post_processor(
    tokens: list[str], bos: int | None, eos: int | None
) -> processors.PostProcessor:
    first = [(tokens[bos], bos)] if bos is not None else []
    last = [(tokens[eos], eos)] if eos is not None else []
    single = [t for t, _ in first] + ["$A"] + [t for t, _ in last]
    pair = single + ["$B:1"] + [f"{t}:1" for t, _ in first + last]
    return processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=first + last
    )


def build_tokenizer(
    meta: dict[str, Any], source: str | Path = "GGUF file", extra: dict | None = None
) -> TokenizerWrapper:
    """mlx-lm `TokenizerWrapper` for the tokenizer described by GGUF metadata `meta`."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if kind == "gpt2":
        backend = _byte_level(
            tokens, meta.get("tokenizer.ggml.merges", []), meta.get("tokenizer.ggml.pre")
        )
        detokenizer = BPEStreamingDetokenizer
    elif kind == "llama":
        # Gemma stores whitespace runs as real spaces; the pieces are spelled with U+2581.
        tokens = [_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        backend = _sentencepiece(meta, tokens, types)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        detokenizer = partial(SPMStreamingDetokenizer, trim_space=prefix)
    else:
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")

    vocab = backend.get_vocab()
    special = [t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    # User-defined pieces match whole and greedily, before BPE (as SentencePiece and llama.cpp do).
    user = [
        t
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == _USER_DEFINED and vocab.get(t) == i
    ]
    backend.add_tokens([AddedToken(t, special=False, normalized=kind == "llama") for t in user])

    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_IDS.items()}
    # Flag as the file says; when absent, llama.cpp's default: BOS for SentencePiece only.
    # (SmolLM2's file says False, which matches its HF tokenizer: no BOS.)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = ids["bos_token"] if add_bos else None, ids["eos_token"] if add_eos else None
    backend.post_processor = _post_processor(tokens, bos, eos)

    kwargs: dict[str, Any] = {
        name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)
    }
    kwargs.update(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        chat_template=meta.get("tokenizer.chat_template"),
    )
    kwargs.update({k: v for k, v in (extra or {}).items() if k != "trust_remote_code"})
    hf_tokenizer = PreTrainedTokenizerFast(**kwargs)
    return TokenizerWrapper(hf_tokenizer, detokenizer, eos_token_ids=_eos_ids(meta, tokens))


_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _eos_ids(meta: dict[str, Any], tokens: list[str]) -> list[int]:
    ids = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")} - {None}
    index = {t: i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    return sorted(ids | set(index.values()))
