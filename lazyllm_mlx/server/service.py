"""What `lazyllm-mlx serve` does with a request: prompt tokens, schedule, cache reuse, stop strings.

One model serves every request, so generations are serialized by one lock: a request holds it from
`start` until its Generation is closed (streaming included); the others wait their turn. Tokenizing
and validating happen before the lock, so a bad request never waits behind a long generation.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.server import convert_chat

from ..config import LazyConfig
from ..generate import (
    GenerationResponse,
    context_length,
    encode_prompt,
    for_model,
    make_lazy_cache,
    stream_generate,
)
from ..stats import LazyStats, lazy_fields
from .prompt_caches import PromptCaches, settle
from .protocol import SERVER_DEFAULT, CompletionRequest, RequestError

# No tokenizer we know puts more characters than this in one token (runs of spaces or '=' in
# code reach 16-32): a prompt longer than context x this cannot fit.
MAX_CHARACTERS_PER_TOKEN = 64


@dataclass
class Finish:
    """How a request ended, with its counts and LazyLLM figures."""

    reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (the client left)
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens found in the server's cache, not prefilled again
    schedule: str
    ttft: float
    stats: LazyStats | None
    logprobs: list[dict[str, Any]] | None = None  # one entry per sent token, when asked

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.reused_tokens},
        }

    def lazyllm(self) -> dict[str, Any]:
        """Our non-standard response field; prefill figures cover this request's new tokens."""
        figures = lazy_fields(self.stats)
        return {
            "schedule": self.schedule,
            "ttft": self.ttft,
            "reused_tokens": self.reused_tokens,
            "prefilled_tokens": self.prompt_tokens - self.reused_tokens,
            **{name: figures[name] for name in ("prefill_fraction", "revived", "pruned")},
        }


class StopText:
    """Generated text cut at the first stop string; text that may begin one is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, segment: str) -> str:
        """Append `segment`; returns the text that can now be sent."""
        if self.stopped:
            return ""
        self.text += segment
        hits = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        self.stopped = bool(hits)
        end = min(hits) if hits else len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """The held-back text, at the end of a generation that met no stop string."""
        out = "" if self.stopped else self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def _held(self) -> int:
        rest, held = self.text[self.sent :], 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(rest)), held, -1):
                if rest.endswith(stop[:k]):
                    held = k
                    break
        return held


def token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class GenerationService:
    """The model, its tokenizer, the server's defaults, the prompt caches and the lock."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        lazy: LazyConfig | None,
        model_id: str = "default",
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        prefill_step_size: int = 2048,
        chat_template_args: dict[str, Any] | None = None,
        cache_slots: int = 4,
        cache_bytes: int | None = None,
    ):
        self.model, self.tokenizer, self.lazy, self.model_id = model, tokenizer, lazy, model_id
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.top_k, self.min_p = top_k, min_p
        self.prefill_step_size = prefill_step_size
        self.chat_template_args = chat_template_args or {}
        self.caches = PromptCaches(cache_slots, cache_bytes)
        self.lock = threading.Lock()

    def prompt_tokens(self, request: CompletionRequest) -> list[int]:
        """The request's prompt as tokens (chat template applied to chats); RequestError if bad."""
        tokenizer = self.tokenizer
        self._check_characters(request)
        if request.kind == "text" and isinstance(request.prompt, list):
            tokens = list(request.prompt)
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
            if vocab is not None and max(tokens) >= vocab:
                raise RequestError(
                    f"Token id {max(tokens)} is outside the vocabulary.", param="prompt"
                )
        elif request.kind == "text":
            tokens = encode_prompt(tokenizer, request.prompt)
        elif tokenizer.has_chat_template:
            options = {**self.chat_template_args, **request.chat_template_kwargs}
            try:
                text = tokenizer.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True, **options
                )
            except Exception as error:  # jinja raises its own errors for messages it refuses
                raise RequestError(f"The chat template refused the messages: {error}") from None
            tokens = tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = tokenizer.encode(convert_chat(request.messages))
        if not tokens:
            raise RequestError("The prompt is empty: it gives no tokens.", param="prompt")
        limit = context_length(self.model)
        if limit is not None and len(tokens) > limit:
            raise RequestError(
                f"The prompt has {len(tokens)} tokens, more than the model's context of {limit}.",
                code="context_length_exceeded",
            )
        return tokens

    def _check_characters(self, request: CompletionRequest) -> None:
        """A prompt far longer in characters than the context can hold in tokens is refused
        before the tokenizer spends minutes on it."""
        limit = context_length(self.model)
        if limit is None or (request.kind == "text" and isinstance(request.prompt, list)):
            return
        text = request.prompt if request.kind == "text" else json.dumps(request.messages)
        if len(text) > limit * MAX_CHARACTERS_PER_TOKEN:
            raise RequestError(
                f"The prompt has {len(text)} characters, more than the model's context of "
                f"{limit} tokens can hold.",
                code="context_length_exceeded",
            )

    def schedule(self, request: CompletionRequest) -> LazyConfig | None:
        """The request's schedule (the server's when it names none); RequestError if invalid."""
        if request.lazy == SERVER_DEFAULT:
            return self.lazy
        try:
            config = for_model(request.lazy, self.model)
            if config is not None:
                config.resolve(len(self.model.layers))
        except (ValueError, TypeError) as error:
            raise RequestError(
                f"Invalid schedule {request.lazy!r}: {error}", param="lazy"
            ) from None
        return config

    def sampling(self, request: CompletionRequest) -> dict[str, Any]:
        """stream_generate's sampler and logits processors for the request's fields (the
        server's defaults where it names none)."""

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        xtc_special = []  # what XTC never cuts, as mlx_lm.server's: a newline, the end tokens
        if request.xtc_probability > 0:
            xtc_special = self.tokenizer.encode("\n") + list(self.tokenizer.eos_token_ids)
        sampler = make_sampler(
            pick(request.temperature, self.temperature),
            top_p=pick(request.top_p, self.top_p),
            min_p=pick(request.min_p, self.min_p),
            top_k=pick(request.top_k, self.top_k),
            xtc_probability=request.xtc_probability,
            xtc_threshold=request.xtc_threshold,
            xtc_special_tokens=xtc_special,
        )
        vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
        if request.logit_bias and vocab is not None and max(request.logit_bias) >= vocab:
            raise RequestError(
                f"logit_bias names token {max(request.logit_bias)}, outside the vocabulary.",
                param="logit_bias",
            )
        processors = make_logits_processors(
            logit_bias=request.logit_bias,
            repetition_penalty=request.repetition_penalty,
            repetition_context_size=request.repetition_context_size,
            presence_penalty=request.presence_penalty,
            presence_context_size=request.presence_context_size,
            frequency_penalty=request.frequency_penalty,
            frequency_context_size=request.frequency_context_size,
        )
        return dict(sampler=sampler, logits_processors=processors or None)

    def start(
        self,
        request: CompletionRequest,
        tokens: list[int],
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Take the lock, reuse the cached prefix and set the generation up (no work yet).

        should_stop: checked after every token (the client left); the generation then ends
        with reason "cancelled". Close the returned Generation (or use it in a `with` block) to
        release the lock.
        """
        lazy = self.schedule(request)
        key = "off" if lazy is None else lazy.to_string()
        self.lock.acquire()
        try:
            if request.seed is not None:
                mx.random.seed(request.seed)
            cache, reused = self.caches.take(key, tokens, partial(self._new_cache, lazy))
            try:
                responses = stream_generate(
                    self.model,
                    self.tokenizer,
                    tokens[reused:],
                    self._max_tokens(request, len(tokens)),
                    lazy=lazy,
                    prompt_cache=cache,
                    prefill_step_size=self.prefill_step_size,
                    prompt_progress_callback=progress,
                    should_stop=should_stop,
                    **self.sampling(request),
                )
            except ValueError as error:
                raise RequestError(str(error)) from None
            return Generation(
                service=self,
                cache_key=key,
                schedule="off" if lazy is None else lazy.name or lazy.to_string(),
                tokens=tokens,
                cache=cache,
                reused=reused,
                responses=responses,
                stops=request.stop,
                top_logprobs=request.top_logprobs if request.logprobs else None,
            )
        except BaseException:
            self.lock.release()
            raise

    def _max_tokens(self, request: CompletionRequest, prompt_tokens: int) -> int:
        """The request's (or the server's) max_tokens, capped by the context the prompt leaves:
        `max_tokens` 10**9 must not mean generating past the model's context for hours."""
        wanted = request.max_tokens or self.max_tokens
        limit = context_length(self.model)
        return wanted if limit is None else max(1, min(wanted, limit - prompt_tokens))

    def _new_cache(self, lazy: LazyConfig | None) -> Any:
        return make_prompt_cache(self.model) if lazy is None else make_lazy_cache(self.model, lazy)


@dataclass(eq=False)
class Generation:
    """A started request: iterate for text pieces; `finish` is set once they are exhausted."""

    service: GenerationService
    cache_key: str  # the prompt-cache slot the request took and gives back
    schedule: str  # the schedule's name in the response
    tokens: list[int]  # the whole prompt
    cache: Any
    reused: int  # prompt tokens the cache already held
    responses: Generator[GenerationResponse, None, None]  # from stream_generate
    stops: list[str]
    top_logprobs: int | None = None  # None: no log-probabilities; N: with N alternatives
    finish: Finish | None = field(default=None, init=False)
    _generated: list[int] = field(default_factory=list, init=False, repr=False)
    _pending: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _sent: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _taken: int = field(default=0, init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        stop = StopText(self.stops)
        last = None
        try:
            for last in self.responses:
                self._generated.append(last.token)
                if self.top_logprobs is not None and last.finish_reason != "stop":
                    self._pending.append(self._logprob(last))  # EOS is no sent token
                text = stop.add(last.text)
                if text and not stop.stopped:
                    self._sent += self._pending  # tokens held back with a stop string's start
                    self._pending = []
                if text:
                    yield text
                if stop.stopped:
                    break
            if not stop.stopped:
                self._sent += self._pending
                self._pending = []
            if tail := stop.flush():
                yield tail
        except Exception:
            self._failed = True  # a half-run step may have left the cache inconsistent
            raise
        self.finish = Finish(
            reason="stop" if stop.stopped else last.finish_reason,
            prompt_tokens=len(self.tokens),
            completion_tokens=len(self._generated),
            reused_tokens=self.reused,
            schedule=self.schedule,
            ttft=last.ttft,
            stats=last.lazy,
            logprobs=None if self.top_logprobs is None else list(self._sent),
        )

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        """Entries of the tokens sent since the last call (streaming), None when not asked."""
        if self.top_logprobs is None:
            return None
        entries, self._taken = self._sent[self._taken :], len(self._sent)
        return entries

    def _logprob(self, response: GenerationResponse) -> dict[str, Any]:
        """OpenAI's entry for one token: the text it added, its log-probability, bytes and the
        most likely alternatives (each decoded alone)."""
        logprobs = response.logprobs.astype(mx.float32)
        entry = token_entry(response.text, logprobs[response.token].item())
        alternatives = []
        if self.top_logprobs:
            top = mx.argpartition(-logprobs, self.top_logprobs - 1)[: self.top_logprobs]
            top = top[mx.argsort(-logprobs[top])].tolist()
            values = logprobs[mx.array(top)].tolist()
            decode = self.service.tokenizer.decode
            alternatives = [
                token_entry(response.text if t == response.token else decode([t]), v)
                for t, v in zip(top, values)
            ]
        return {**entry, "top_logprobs": alternatives}

    def close(self) -> None:
        """End the generation (early or not), keep the cache for the next request, unlock."""
        if self._closed:
            return
        self._closed = True
        try:
            self.responses.close()
            if not self._failed:
                settle(self.cache)
                self.service.caches.put(self.cache_key, self.tokens + self._generated, self.cache)
        finally:
            self.service.lock.release()
