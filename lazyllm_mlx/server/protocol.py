"""OpenAI-style requests and responses for `lazyllm-mlx serve`: parsing, validation, JSON shapes.

The shapes follow mlx-lm's server (itself following OpenAI): `chat.completion`,
`chat.completion.chunk` and `text_completion` objects, `usage` with
`prompt_tokens_details.cached_tokens`, errors as `{"error": {"message", "type", "param", "code"}}`.
Our own figures go in a non-standard `lazyllm` field.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SERVER_DEFAULT = "server-default"  # `lazy` when the request does not name a schedule
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        error = dict(message=str(self), type=self.kind, param=self.param, code=self.code)
        return {"error": error}


@dataclass
class CompletionRequest:
    """One /v1/chat/completions or /v1/completions request, validated."""

    kind: str  # "chat" or "text"
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    prompt: str | list[int] = ""  # text
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None  # None: the server's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int = 20  # mlx-lm's default
    presence_penalty: float | None = None
    presence_context_size: int = 20
    frequency_penalty: float | None = None
    frequency_context_size: int = 20
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1  # mlx-lm server's default
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token (with logprobs)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    lazy: Any = SERVER_DEFAULT  # a schedule string or dict, None for plain mlx-lm
    model: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    created: int = 0

    @property
    def object(self) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if self.stream else "chat.completion"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, param=param)


def _check_unicode(body: Any) -> None:
    """JSON may escape lone surrogates ("\\ud800"), which no tokenizer can encode."""
    pending = [body]
    while pending:  # iterative: the nesting may be as deep as the parser allowed
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                bad = value[error.start : error.end].encode("unicode_escape").decode()
                raise _bad(f"The request holds invalid Unicode: a lone surrogate {bad}.") from None


def parse_request(kind: str, raw: bytes) -> CompletionRequest:
    """Parse and validate a request body; raises RequestError (400) with what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _bad(f"Invalid JSON in request body: {error}") from None
    except ValueError as error:  # an integer of more than 4,300 digits
        raise _bad(f"Invalid JSON in request body: {error}") from None
    except RecursionError:
        raise _bad("Invalid JSON in request body: it is nested too deeply.") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    _check_unicode(body)
    request = CompletionRequest(kind=kind, created=int(time.time()))
    request.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    if kind == "chat":
        request.messages = _messages(body)
    else:
        request.prompt = _prompt(body)
    request.stream = _optional(body, "stream", bool, "a boolean") or False
    options = _optional(body, "stream_options", dict, "an object") or {}
    request.include_usage = bool(options.get("include_usage", False))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise _bad("max_tokens must be an integer >= 1.", "max_tokens")
    request.max_tokens = max_tokens
    request.temperature = _number(body, "temperature", 0.0, None)
    request.top_p = _number(body, "top_p", 0.0, 1.0)
    request.top_k = _integer(body, "top_k", 0, None)
    request.min_p = _number(body, "min_p", 0.0, 1.0)
    request.repetition_penalty = _number(body, "repetition_penalty", 0.0, None)
    context = _integer(body, "repetition_context_size", 1, None)
    request.repetition_context_size = 20 if context is None else context
    request.presence_penalty = _number(body, "presence_penalty", -2.0, 2.0)
    request.frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0)
    for name in ("presence_context_size", "frequency_context_size"):
        if (size := _integer(body, name, 1, None)) is not None:
            setattr(request, name, size)
    for name in ("xtc_probability", "xtc_threshold"):
        if (value := _number(body, name, 0.0, 1.0)) is not None:
            setattr(request, name, value)
    request.logit_bias = _logit_bias(body.get("logit_bias"))
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise _bad(f"{name} is not supported: {UNSUPPORTED[name]}.", name)
    request.logprobs, request.top_logprobs = _logprobs(body, kind)
    request.stop = _stop(body.get("stop"))
    request.seed = _integer(body, "seed", 0, 2**64 - 1)
    n = body.get("n", 1)
    if n != 1:
        raise _bad("Only n=1 is supported (one model, one generation at a time).", "n")
    if "lazy" in body:
        lazy = body["lazy"]
        if lazy is not None and not isinstance(lazy, (str, dict)):
            raise _bad("lazy must be a schedule string, an object, or null (plain mlx-lm).", "lazy")
        request.lazy = None if lazy == "off" else lazy
    request.model = _optional(body, "model", str, "a string")
    request.chat_template_kwargs = _optional(body, "chat_template_kwargs", dict, "an object") or {}
    refused = [key for key in request.chat_template_kwargs if key in _TEMPLATE_KWARGS_REFUSED]
    if refused:
        raise _bad(f"chat_template_kwargs may not set {refused[0]!r}: "
                   f"{_TEMPLATE_KWARGS_REFUSED[refused[0]]}.", "chat_template_kwargs")  # fmt: skip
    return request


# OpenAI fields this server refuses rather than ignore, and why.
UNSUPPORTED = {
    "tools": "this server does not parse tool calls",
    "tool_choice": "this server does not parse tool calls",
    "functions": "this server does not parse function calls",
    "function_call": "this server does not parse function calls",
    "response_format": "this server does not constrain the output's format",
    # mlx_lm.server's own fields
    "draft_model": "speculative decoding does not fit the lazy engine's one-token decoding",
    "num_draft_tokens": "speculative decoding does not fit the lazy engine's one-token decoding",
    "adapters": "this server serves one model; start it with --adapter-path",
    "role_mapping": "this server formats chats with the model's chat template only",
}


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    if value is None:
        return None
    bad = _bad("logit_bias must map token ids to numbers from -100 to 100.", "logit_bias")
    if not isinstance(value, dict):
        raise bad
    bias = {}
    for key, number in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad
        if not _is_number(number) or not -100 <= number <= 100:
            raise bad
        bias[int(key)] = float(number)
    return bias


# Template arguments a request may not give: a template of its own would run unbounded code on
# the server; the others are the server's to set.
_TEMPLATE_KWARGS_REFUSED = {
    "chat_template": "a request's own template would run on the server with no bound on its time",
    "tokenize": "the server sets it",
    "add_generation_prompt": "the server sets it",
    "conversation": "the messages are the request's `messages`",
    "return_dict": "the server sets it",
}


def _optional(body: dict, name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise _bad(f"{name} must be {what}.", name)
    return value


def _number(body: dict, name: str, low: float, high: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # json.loads accepts NaN and Infinity, which no bound check catches, and integers too large
    # for a float (10**400)
    if _is_int(value):
        finite = abs(value) < 1e300
    else:
        finite = _is_number(value) and math.isfinite(value)
    if not finite or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(f"{name} must be a number {bounds}.", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(f"{name} must be an integer {bounds}.", name)
    return value


def _logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(report log-probabilities, alternatives per token). Chat: `logprobs` true and
    `top_logprobs` N (OpenAI's chat API); completions: also `logprobs` N (the legacy API)."""
    value, top = body.get("logprobs"), _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if value is None or value is False:
        if top:
            raise _bad("top_logprobs needs logprobs: true.", "top_logprobs")
        return False, 0
    if value is True:
        return True, top or 0
    if kind == "text" and _is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS:
        return True, value
    what = "true or false" if kind == "chat" else f"true, false or an integer 0-{MAX_TOP_LOGPROBS}"
    raise _bad(f"logprobs must be {what}.", "logprobs")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings.", "stop")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("The request has no messages.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of message objects.", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role.", "messages")
        clean.append({**message, "content": _content(message.get("content"), i)})
    return clean


def _content(content: Any, i: int) -> str:
    """Message content as text: a string, or a list of text parts (OpenAI's content parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(f"messages[{i}]: only text content parts are supported.", "messages")
            if not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}]: a text part needs a string 'text'.", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts.", "messages")


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("The request has no prompt.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("The prompt is empty.", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return prompt
    raise _bad("prompt must be a non-empty string or a list of token ids.", "prompt")


def response_body(
    request: CompletionRequest,
    model_id: str,
    text: str,
    finish_reason: str | None,
    extra: dict[str, Any] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    role: bool = True,
) -> dict[str, Any]:
    """A whole response (non-streaming) or one SSE chunk (streaming), mlx-lm's shapes.

    logprobs: the entries (token, logprob, bytes, top_logprobs) of the tokens this response
    carries, when the request asked for them. role: a chat chunk names the role (the first)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if request.kind == "text":
        choice.update(text=text, logprobs=None if logprobs is None else legacy_logprobs(logprobs))
    elif request.stream:
        choice["delta"] = {**({"role": "assistant"} if role else {}),
                           **({"content": text} if text else {})}  # fmt: skip
    else:
        choice["message"] = {"role": "assistant", "content": text}
    if request.kind == "chat" and logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    body = {
        "id": request.id,
        "object": request.object,
        "created": request.created,
        "model": model_id,
        "choices": [choice],
    }
    return {**body, **(extra or {})}


def legacy_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """/v1/completions' shape: parallel lists, alternatives as {token: logprob}."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def usage_chunk(request: CompletionRequest, model_id: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    body = response_body(request, model_id, "", None)
    return {**body, "choices": [], "usage": usage}
