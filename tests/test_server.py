"""`lazyllm-mlx serve` against a real server on a loopback port, with a tiny random model."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

from lazyllm_mlx import LazyConfig, generate
from lazyllm_mlx.server import GenerationService, make_server
from lazyllm_mlx.server.service import StopText

import pytest
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


@pytest.fixture(scope="module")
def server():
    model = tiny_model("llama")
    service = GenerationService(
        model, chat_tokenizer(), lazy=LazyConfig.preset("paper"), model_id="tiny", max_tokens=8
    )
    server = make_server(service, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


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
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": " ".join(["t5"] * 4097)}, 400, "context"),
    ("/v1/completions", {"prompt": [5, 999]}, 400, "vocabulary"),
    ("/v1/embeddings", {"input": "t5"}, 404, "No such endpoint"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_json_errors(server, path, body, status, message):
    got, error = post(server, path, body)
    assert got == status
    assert message in error["error"]["message"] and error["error"]["type"]


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
    assert response.readline().startswith(b"data: ")
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
