"""`lazyllm-mlx serve` against a real server on a loopback port, with a tiny random model."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from lazyllm_mlx import LazyConfig, generate
from lazyllm_mlx.server import GenerationService, make_server
from lazyllm_mlx.server.service import StopText

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tiny_models import tiny_model, tiny_tokenizer

# A word-level template over the tiny vocabulary: t2 opens a user turn, t3 an assistant one.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}t2 {% else %}t3 {% endif %}"
    "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
)
DOCUMENT = " ".join(f"t{5 + (7 * i) % 120}" for i in range(300))


def chat_tokenizer() -> TokenizerWrapper:
    hf = tiny_tokenizer()._tokenizer
    hf.chat_template = TEMPLATE
    return TokenizerWrapper(hf)


@contextmanager
def tiny_server() -> Iterator:
    """A tiny model served as 'tiny' (schedule paper, 8 tokens) on a free loopback port."""
    model = tiny_model("llama")
    service = GenerationService(
        model, chat_tokenizer(), lazy=LazyConfig.preset("paper"), model_id="tiny", max_tokens=8
    )
    server = make_server(service, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server():
    with tiny_server() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_caches(server):
    server.service.caches.clear()


def post(server, path: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stream(server, path: str, body: dict) -> list[dict]:
    """The SSE events of a streamed request, parsed; checks the stream ends with [DONE]."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = response.read().decode().split("\n\n")
    events = [line for line in lines if line and not line.startswith(":")]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def chat(content: str = DOCUMENT, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


def test_chat_completion(server):
    status, body = post(server, "/v1/chat/completions", chat(max_tokens=6))
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 303  # t2 + 300 words + t4 t3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    lazy = body["lazyllm"]
    assert lazy["schedule"] == "paper" and lazy["ttft"] > 0 and lazy["prefilled_tokens"] == 303
    assert lazy["prefill_fraction"] < 0.8 and lazy["revived"] >= 0


def test_streaming_gives_the_same_text(server):
    _, whole = post(server, "/v1/chat/completions", chat())
    server.service.caches.clear()
    events = stream(
        server, "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})
    )
    *chunks, finish, usage = events
    assert all(c["object"] == "chat.completion.chunk" for c in chunks + [finish])
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in chunks)
        == (whole["choices"][0]["message"]["content"])
    )
    assert finish["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert finish["lazyllm"]["schedule"] == "paper"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_text_completion_off_is_plain_mlx_lm(server):
    prompt = "t5 t6 t7 t8 t9"
    status, body = post(
        server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "lazy": "off"}
    )
    assert status == 200 and body["object"] == "text_completion"
    expected = generate(server.service.model, server.service.tokenizer, prompt, max_tokens=5)
    assert body["choices"][0]["text"] == expected
    assert body["lazyllm"]["schedule"] == "off" and body["lazyllm"]["prefill_fraction"] is None
    events = stream(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "stream": True})
    assert all(e["object"] == "text_completion" for e in events)


def test_models_and_health(server):
    assert get(server, "/health") == (200, {"status": "ok"})
    status, body = get(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert get(server, "/v2/nothing")[0] == 404


SPINNING_TEMPLATE = "{% for i in range(10**9) %}x{% endfor %}"  # minutes of CPU if rendered
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "Invalid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "no messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "t5"}]}, 400, "string role"),
    ("/v1/chat/completions", chat(max_tokens="ten"), 400, "max_tokens"),
    ("/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", chat(top_p=2), 400, "top_p"),
    ("/v1/chat/completions", chat(stop=[1]), 400, "stop"),
    ("/v1/chat/completions", chat(stream="yes"), 400, "stream"),
    ("/v1/chat/completions", chat(lazy="bogus"), 400, "Invalid schedule"),
    ("/v1/chat/completions", chat(lazy="40:0.5"), 400, "Invalid schedule"),  # past the last layer
    # a `lazy` object is checked as a schedule string is: types, then ranges
    ("/v1/chat/completions", chat(lazy={"pool": 3.0}), 400, "pool must be a whole number"),
    ("/v1/chat/completions", chat(lazy={"window": 2.5}), 400, "window must be a whole number"),
    (
        "/v1/chat/completions",
        chat(lazy={"min_prompt_tokens": 0, "revive_cap": 0.5}),
        400,
        "revive_cap must be a whole number",
    ),  # fmt: skip
    ("/v1/chat/completions", chat(lazy={"boundaries": [2], "keep": [1e30]}), 400, "out of range"),
    ("/v1/chat/completions", chat(lazy="2:inf"), 400, "out of range"),
    ("/v1/chat/completions", chat(temperature=10**400), 400, "temperature"),
    (
        "/v1/chat/completions",
        chat(chat_template_kwargs={"chat_template": SPINNING_TEMPLATE}),
        400,
        "may not set 'chat_template'",
    ),  # fmt: skip
    ("/v1/chat/completions", chat(chat_template_kwargs={"tokenize": True}), 400, "'tokenize'"),
    ("/v1/chat/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "Invalid JSON"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": " ".join(["t5"] * 4097)}, 400, "context"),
    ("/v1/completions", {"prompt": "t5" * (4096 * 64)}, 400, "characters, more than the model"),
    ("/v1/chat/completions", chat(content="t5" * (4096 * 64)), 400, "characters, more than"),
    ("/v1/completions", {"prompt": [5, 999]}, 400, "vocabulary"),
    ("/v1/embeddings", {"input": "t5"}, 404, "No such endpoint"),
    ("/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools is not supported"),
    (
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}),
        400,
        "response_format is not supported",
    ),  # fmt: skip
    ("/v1/chat/completions", chat(presence_penalty=3), 400, "presence_penalty"),
    ("/v1/chat/completions", chat(frequency_penalty="x"), 400, "frequency_penalty"),
    ("/v1/chat/completions", chat(logit_bias={"t5": 1}), 400, "logit_bias must map"),
    ("/v1/chat/completions", chat(logit_bias={"5": 101}), 400, "logit_bias must map"),
    ("/v1/chat/completions", chat(logit_bias={"999": 1}), 400, "outside the vocabulary"),
    ("/v1/chat/completions", chat(xtc_probability=2), 400, "xtc_probability"),
    ("/v1/chat/completions", chat(presence_context_size=0), 400, "presence_context_size"),
    ("/v1/chat/completions", chat(draft_model="small"), 400, "draft_model is not supported"),
    ("/v1/chat/completions", chat(adapters="lora"), 400, "start it with --adapter-path"),
    ("/v1/chat/completions", chat(role_mapping={}), 400, "role_mapping is not supported"),
    (
        "/v1/chat/completions",
        chat(model="mlx-community/Llama-3.2-1B-Instruct-4bit"),
        404,
        "this server serves 'tiny'",
    ),  # fmt: skip
]


def test_mlx_lm_server_s_own_sampling_fields(server):
    model, tokenizer = server.service.model, server.service.tokenizer
    prompt = "t5 t6 t7 t8 t9 t5 t6"
    body = {"prompt": prompt, "max_tokens": 6, "lazy": "none"}
    for name in ("presence", "frequency"):
        fields = {f"{name}_penalty": 2.0, f"{name}_context_size": 1}
        processors = make_logits_processors(logit_bias={9: 3.0}, **fields)
        expected = generate(model, tokenizer, prompt, max_tokens=6, lazy="none",
                            logits_processors=processors)  # fmt: skip
        got = post(server, "/v1/completions", {**body, **fields, "logit_bias": {"9": 3}})[1]
        # t9 comes back: with mlx-lm's default context (20) the prompt's t9 would hold it off
        assert got["choices"][0]["text"] == expected and "t9" in expected.split()
    special = tokenizer.encode("\n") + list(tokenizer.eos_token_ids)
    sampler = make_sampler(1.0, xtc_probability=1.0, xtc_threshold=0.02,
                           xtc_special_tokens=special)  # fmt: skip
    mx.random.seed(3)
    expected = generate(model, tokenizer, prompt, max_tokens=6, lazy="none", sampler=sampler)
    fields = dict(temperature=1.0, seed=3, xtc_probability=1.0, xtc_threshold=0.02)
    assert post(server, "/v1/completions", {**body, **fields})[1]["choices"][0]["text"] == expected


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_json_errors(server, path, body, status, message):
    got, error = post(server, path, body)
    assert got == status
    assert message in error["error"]["message"] and error["error"]["type"]


def test_logit_bias_and_penalties_steer_the_tokens(server):
    status, body = post(server, "/v1/chat/completions",
                        chat(max_tokens=4, lazy="none", logit_bias={"9": 100}))  # fmt: skip
    assert status == 200 and body["choices"][0]["message"]["content"].split() == ["t9"] * 4
    _, plain = post(server, "/v1/chat/completions", chat(max_tokens=8, lazy="none"))
    _, penalized = post(server, "/v1/chat/completions",
                        chat(max_tokens=8, lazy="none", frequency_penalty=2.0,
                             presence_penalty=2.0, logit_bias={"9": 5}))  # fmt: skip
    answers = [body["choices"][0]["message"]["content"] for body in (plain, penalized)]
    assert answers[0] != answers[1]


def test_only_the_first_streamed_chunk_names_the_role(server):
    *chunks, finish = stream(server, "/v1/chat/completions", chat(stream=True, max_tokens=4))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] + [finish])


def test_server_keeps_serving_after_errors(server):
    for path, body, *_ in BAD_REQUESTS[:3]:
        post(server, path, body)
    assert post(server, "/v1/chat/completions", chat(max_tokens=2))[0] == 200


@pytest.mark.parametrize("lazy", ["none", None], ids=["none", "off"])
def test_a_shared_prefix_reuses_the_cache_and_changes_nothing_unpruned(server, lazy):
    first = chat(lazy=lazy)
    _, one = post(server, "/v1/chat/completions", first)
    reply = one["choices"][0]["message"]["content"]
    turn = chat(lazy=lazy, max_tokens=6)
    turn["messages"] += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "t9 t8"},
    ]
    _, two = post(server, "/v1/chat/completions", turn)
    reused = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reused >= 303 + len(reply.split()) - 1  # the first prompt and (nearly) all its reply
    assert two["lazyllm"]["reused_tokens"] == reused
    assert two["lazyllm"]["prefilled_tokens"] == two["usage"]["prompt_tokens"] - reused
    server.service.caches.clear()
    _, fresh = post(server, "/v1/chat/completions", turn)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert fresh["choices"][0]["message"] == two["choices"][0]["message"]


def test_an_unrelated_request_does_not_evict_a_conversation(server):
    _, one = post(server, "/v1/chat/completions", chat(lazy="paper"))
    _, hi = post(server, "/v1/chat/completions", chat("t9 t8", lazy="paper", max_tokens=2))
    assert hi["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the header alone: new
    turn = chat(lazy="paper", max_tokens=4)
    turn["messages"] += [
        {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
        {"role": "user", "content": "t9 t8"},
    ]
    _, two = post(server, "/v1/chat/completions", turn)
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= 303  # its cache was kept
    assert len(server.service.caches) == 2


def test_the_same_prompt_again_prefills_one_token(server):
    post(server, "/v1/chat/completions", chat())
    _, again = post(server, "/v1/chat/completions", chat())
    assert again["lazyllm"]["reused_tokens"] == 302 and again["lazyllm"]["prefilled_tokens"] == 1


def test_per_request_schedules_keep_their_own_caches(server):
    _, none = post(server, "/v1/chat/completions", chat(lazy="none"))
    assert none["lazyllm"]["schedule"] == "none" and none["lazyllm"]["prefill_fraction"] == 1.0
    _, custom = post(server, "/v1/chat/completions", chat(lazy="0.3:0.5"))
    assert (
        custom["lazyllm"]["schedule"] == "0.3:0.5" and custom["lazyllm"]["prefill_fraction"] < 0.7
    )
    _, off = post(server, "/v1/chat/completions", chat(lazy=None))
    assert off["lazyllm"]["schedule"] == "off"
    _, default = post(server, "/v1/chat/completions", chat())
    assert default["lazyllm"]["schedule"] == "paper"
    assert default["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # new to "paper"
    _, again = post(server, "/v1/chat/completions", chat(lazy="none"))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 302


def test_stop_strings_cut_the_text(server):
    _, free = post(server, "/v1/chat/completions", chat(lazy="none"))
    text = free["choices"][0]["message"]["content"]
    stop = f" {text.split()[2]}"
    expected = text[: text.index(stop)]
    server.service.caches.clear()
    _, cut = post(server, "/v1/chat/completions", chat(lazy="none", stop=stop))
    assert cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    server.service.caches.clear()
    events = stream(server, "/v1/chat/completions", chat(lazy="none", stop=[stop], stream=True))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected


def test_seeded_sampling_repeats(server):
    body = chat(lazy="none", temperature=1.0, top_p=0.9, seed=3)
    texts = []
    for _ in range(2):
        server.service.caches.clear()
        texts.append(post(server, "/v1/chat/completions", body)[1]["choices"][0]["message"])
    assert texts[0] == texts[1]


def test_a_client_that_leaves_mid_stream_releases_the_model(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps(chat(stream=True, max_tokens=2000))
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    line = response.readline()
    while line.startswith(b":") or line == b"\n":  # prefill progress comments on a slow machine
        line = response.readline()
    assert line.startswith(b"data: ")
    connection.close()
    status, body = post(server, "/v1/chat/completions", chat(max_tokens=2))
    assert status == 200
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 302


def test_concurrent_requests_are_served_one_at_a_time(server):
    results = []

    def ask(words):
        results.append(post(server, "/v1/completions", {"prompt": words, "max_tokens": 4}))

    threads = [threading.Thread(target=ask, args=(f"t{5 + i} t6 t7",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [status for status, _ in results] == [200, 200, 200]


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "stopped"),
    [
        (["t5 t", "6 t7"], [" t6"], "t5", True),
        (["t5 t", "8 t7"], [" t6"], "t5 t8 t7", False),
        (["ab", "c"], ["abc", "bd"], "", True),
        (["xab", "d"], ["abc", "bd"], "xa", True),
        (["hello"], [], "hello", False),
    ],
)
def test_stop_text_holds_back_what_may_start_a_stop_string(pieces, stops, sent, stopped):
    stop = StopText(stops)
    out = "".join(stop.add(p) for p in pieces) + stop.flush()
    assert (out, stop.stopped) == (sent, stopped)


def raw_request(server, data: bytes, half_close: bool = False) -> tuple[int, dict]:
    """Send raw bytes (a request line, headers, a body) and parse the JSON answer."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read() or b"{}")


def test_invalid_unicode_and_deep_nesting_are_bad_requests(server):
    status, error = post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", '
                         b'"content": "a \\ud800 b"}]}')  # fmt: skip
    assert status == 400 and "lone surrogate \\ud800" in error["error"]["message"]
    deep = b"[" * 100_000 + b"]" * 100_000
    status, error = post(server, "/v1/chat/completions", b'{"messages": ' + deep + b"}")
    assert status == 400 and "nested too deeply" in error["error"]["message"]
    status, error = post(server, "/v1/completions", b'{"prompt": "t5", "temperature": NaN}')
    assert status == 400 and "temperature" in error["error"]["message"]


@pytest.mark.parametrize(
    ("length", "message"),
    [("-5", "Invalid Content-Length header '-5'"), ("abc", "Invalid Content-Length header")],
)
def test_a_bad_content_length_says_so(server, length, message):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    status, error = raw_request(server, head.encode())
    assert status == 400 and message in error["error"]["message"]


def test_a_short_body_and_http_level_errors_are_json(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}"
    status, error = raw_request(server, head, half_close=True)
    assert status == 400 and "ended after 2 of 50 bytes" in error["error"]["message"]
    status, error = raw_request(server, b"GARBAGE\r\n\r\n")
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    status, error = raw_request(server, b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and "PUT is not allowed" in error["error"]["message"]
    for method in ("TRACE", "CONNECT", "BREW"):  # no handler: 405, not 501 server_error
        status, error = raw_request(server, f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 405 and error["error"]["type"] == "invalid_request_error", method


def test_cors_preflight_and_headers(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Origin": "http://example.org", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
    connection.request("OPTIONS", "/v1/chat/completions", headers=headers)
    response = connection.getresponse()
    response.read()
    assert response.status == 204
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    assert "POST" in response.getheader("Access-Control-Allow-Methods")
    assert response.getheader("Access-Control-Allow-Headers") == "content-type, authorization"
    connection.close()
    request = urllib.request.Request(server.url + "/health", headers={"Origin": "http://a.b"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
    server.allowed_origins = ["http://mine.local"]
    try:
        for origin, allowed in (("http://mine.local", "http://mine.local"), ("http://x.y", None)):
            request = urllib.request.Request(server.url + "/health", headers={"Origin": origin})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.headers["Access-Control-Allow-Origin"] == allowed
    finally:
        server.allowed_origins = ["*"]


def test_a_dropped_plain_request_stops_its_generation(server):
    host, port = server.server_address[:2]
    body = json.dumps(chat(max_tokens=3000, lazy="none")).encode()
    with socket.create_connection((host, port), timeout=30) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not server.service.lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)  # until its generation holds the model
    started = time.monotonic()
    status, _ = post(server, "/v1/chat/completions", chat(max_tokens=1, lazy="none"))
    assert status == 200 and time.monotonic() - started < 20
    held = server.service.caches.held_tokens()["none"]
    assert held < 303 + 200  # the prompt and a few tokens, not 3000 of them


def test_sampling_fields_are_honoured(server):
    model, tokenizer = server.service.model, server.service.tokenizer
    prompt = "t5 t6 t7 t8 t9 t5 t6"
    greedy = generate(model, tokenizer, prompt, max_tokens=6, lazy="none")
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # each leaves only the most likely token
        body = {"prompt": prompt, "max_tokens": 6, "lazy": "none", "temperature": 5.0, **extra}
        assert post(server, "/v1/completions", body)[1]["choices"][0]["text"] == greedy
    processors = make_logits_processors(repetition_penalty=3.0, repetition_context_size=20)
    penalised = generate(model, tokenizer, prompt, max_tokens=6, lazy="none",
                         logits_processors=processors)  # fmt: skip
    body = {"prompt": prompt, "max_tokens": 6, "lazy": "none", "repetition_penalty": 3.0}
    assert post(server, "/v1/completions", body)[1]["choices"][0]["text"] == penalised


def test_logprobs_in_openai_shapes(server):
    _, body = post(server, "/v1/chat/completions", chat(logprobs=True, top_logprobs=3))
    content = body["choices"][0]["logprobs"]["content"]
    text = body["choices"][0]["message"]["content"]
    assert "".join(e["token"] for e in content) == text
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(values[0])
        assert entry["bytes"] == list(entry["token"].encode())
    server.service.caches.clear()
    events = stream(server, "/v1/chat/completions", chat(logprobs=True, top_logprobs=3,
                                                         stream=True))  # fmt: skip
    streamed = [e for ev in events for e in ev["choices"][0].get("logprobs", {})["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    _, plain = post(server, "/v1/chat/completions", chat())
    assert "logprobs" not in plain["choices"][0]
    _, legacy = post(server, "/v1/completions", {"prompt": "t5 t6 t7", "logprobs": 2})
    logprobs = legacy["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == legacy["choices"][0]["text"]
    assert (
        len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["text_offset"])
    )
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


BAD_FIELDS = [
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": 3}, "logprobs"),  # an integer is the completions API's form
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_bad_sampling_fields_are_refused(server, fields, param):
    status, error = post(server, "/v1/chat/completions", chat(**fields))
    assert status == 400 and param in error["error"]["message"]


def test_prompt_caches_are_bounded_by_bytes(server):
    caches = server.service.caches
    sizes = []
    for lazy in ("none", None):
        caches.clear()
        post(server, "/v1/chat/completions", chat(lazy=lazy, max_tokens=2))
        sizes.append(caches.nbytes)
    caches.clear()
    caches.max_bytes = int(max(sizes) * 1.3)  # room for either cache, not for both
    assert sum(sizes) > caches.max_bytes
    try:
        post(server, "/v1/chat/completions", chat(lazy="none", max_tokens=2))
        post(server, "/v1/chat/completions", chat(lazy=None, max_tokens=2))
        assert caches.nbytes <= caches.max_bytes and list(caches.held_tokens()) == ["off"]
    finally:
        caches.max_bytes = None


def test_serve_cli_refuses_a_busy_port_in_one_line(capsys, monkeypatch):
    from lazyllm_mlx.cli import main

    monkeypatch.setattr("lazyllm_mlx.cli.serve.load_model", lambda *a: pytest.fail("loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_serve_takes_mlx_lm_server_loading_flags(capsys, monkeypatch):
    from lazyllm_mlx.cli import main

    seen = {}

    def load_model(args, model):
        seen.update(adapter=args.adapter_path, trust=args.trust_remote_code)
        tokenizer = tiny_tokenizer()  # no template of its own
        return tiny_model("llama"), tokenizer

    def stop_serving(server, *a, **k):
        tokenizer = server.service.tokenizer
        seen.update(template=tokenizer.has_chat_template and tokenizer._tokenizer.chat_template)
        raise KeyboardInterrupt

    monkeypatch.setattr("lazyllm_mlx.cli.serve.load_model", load_model)
    monkeypatch.setattr("lazyllm_mlx.server.http.LazyServer.serve_forever", stop_serving)
    argv = ["serve", "--port", "0", "--adapter-path", "lora", "--trust-remote-code",
            "--chat-template", TEMPLATE, "--log-level", "WARNING", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert seen == {"adapter": "lora", "trust": True, "template": TEMPLATE}
    assert main(["serve", "--use-default-chat-template"]) == 2
    assert "transformers no longer ships default" in capsys.readouterr().err


def test_serve_help_shows_the_defaults(capsys):
    from lazyllm_mlx.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("8080", "127.0.0.1", "512", "2048"):
        assert f"(default: {flag})" in out
