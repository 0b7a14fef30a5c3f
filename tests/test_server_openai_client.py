"""`lazyllm-mlx serve` as the official `openai` Python client sees it (skipped without it)."""

from __future__ import annotations

import pytest
from test_server import DOCUMENT, tiny_server

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": DOCUMENT}]


@pytest.fixture(scope="module")
def served():
    with tiny_server() as server:
        yield server


@pytest.fixture
def client(served):
    served.service.caches.clear()
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_completion(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    (choice,) = response.choices
    assert response.model == "tiny" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == 303 and response.usage.completion_tokens >= 1
    assert response.model_extra["lazyllm"]["schedule"] == "paper"  # our extension survives


def test_streaming_with_usage(client, served):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES)
    served.service.caches.clear()
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    *chunks, last = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert last.choices == [] and last.usage == whole.usage


def test_completion(client):
    response = client.completions.create(model="tiny", prompt="t5 t6 t7 t8", max_tokens=4)
    assert response.object == "text_completion" and response.choices[0].text
    assert response.usage.prompt_tokens == 4


def test_another_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="mlx-community/Llama-3.2-1B", messages=MESSAGES)
    assert error.value.code == "model_not_found" and "'tiny'" in error.value.message


def test_tools_are_a_bad_request(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools)
    assert error.value.param == "tools" and "tools is not supported" in error.value.message
