"""The server under abuse, on loopback only and bounded in time: a client that stops reading, one
that leaves during the prefill, slow or idle connections, a flood of them, many requests."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

from lazyllm_mlx import LazyConfig
from lazyllm_mlx.server import GenerationService, make_server
from lazyllm_mlx.server.protocol import parse_request
from lazyllm_mlx.server.worker import GenerationWorker

import pytest
from test_server import chat, chat_tokenizer
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def service():
    return GenerationService(tiny_model("llama"), chat_tokenizer(), lazy=LazyConfig.preset("paper"),
                             model_id="tiny", max_tokens=8, prefill_step_size=32)  # fmt: skip


@pytest.fixture
def serve(service):
    """Start a server with the given socket timeout and connection cap; stopped afterwards."""
    started = []

    def start(timeout: float = 30.0, max_connections: int = 64):
        server = make_server(service, port=0, quiet=True, timeout=timeout,
                             max_connections=max_connections)  # fmt: skip
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def post(server, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode())  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def send_request(server, body: dict, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(server.server_address[:2])
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_client_that_stops_reading_stalls_no_one_else(serve, service):
    server = serve(timeout=1.0)
    # ~3,700 tokens with 20 alternatives each: megabytes of events the client never reads
    greedy = chat(stream=True, max_tokens=10**6, lazy="none", logprobs=True, top_logprobs=20)
    stalled = send_request(server, greedy, receive_buffer=4096)
    try:
        assert wait_until(service.lock.locked, 30)  # its generation runs
        started = time.monotonic()
        status, body = post(server, chat(max_tokens=2, lazy="none"), timeout=60)
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
        # the stalled client's writes time out and its generation is cancelled, not finished
        assert time.monotonic() - started < 30
        held = service.caches.held_tokens().get("none", 0)
        assert held < 4096 - 50, "the stalled generation ran to the end of the context"
    finally:
        stalled.close()


def test_a_client_gone_during_the_prefill_frees_the_model_within_a_chunk(service):
    worker = GenerationWorker(service)
    try:
        prompt = " ".join(["t5 t6 t7"] * 600)  # 1,800 tokens: 57 prefill chunks of 32
        request = parse_request("chat", json.dumps(chat(prompt, lazy="none")).encode())
        job = worker.submit(request, service.prompt_tokens(request))
        events = []
        while not events or events[-1][0] not in ("finish", "cancelled", "error"):
            events.append(job.events.get(timeout=60))
            if events[-1][0] == "progress":
                job.cancel()  # the client left after the first chunk
        kinds = [e[0] for e in events]
        assert kinds[-1] == "cancelled" and "text" not in kinds
        assert kinds.count("progress") <= 2  # stopped at the next chunk, not after 57
        assert not service.lock.locked()
    finally:
        worker.stop()


def test_max_tokens_is_capped_by_the_context_left(serve):
    server = serve()
    prompt = " ".join(["t5"] * 4080)  # the tiny model's context is 4,096 tokens
    status, body = post(server, chat(prompt, max_tokens=10**9, lazy="none"))
    usage = body["usage"]
    assert status == 200 and usage["prompt_tokens"] + usage["completion_tokens"] <= 4096


def test_idle_and_half_sent_connections_time_out(serve):
    server = serve(timeout=0.5)
    for partial in (b"", b"GET /health HTTP/1.1\r\nHost:", b"GET /health\r\n"):  # HTTP/0.9 too
        sock = socket.create_connection(server.server_address[:2], timeout=10)
        sock.sendall(partial)
        started = time.monotonic()
        data = sock.recv(4096)  # the server gives up on it and closes (maybe after a 408)
        while data:
            data = sock.recv(4096)
        assert time.monotonic() - started < 5
        sock.close()


def test_past_the_connection_cap_a_new_connection_gets_503(serve):
    server = serve(max_connections=4)
    idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(4)]
    try:
        assert wait_until(lambda: server._open == 4, 10)
        extra = socket.create_connection(server.server_address[:2], timeout=10)
        answer = extra.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 503") and "Too many open connections" in answer
        extra.close()
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: server._open == 0, 10)
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert response.status == 200


def os_threads() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_threads_and_memory_stay_flat_over_a_500_request_soak(serve):
    server = serve()
    for i in range(50):  # warm: the worker thread, the prompt caches, MLX's buffers
        post(server, chat(f"t{5 + i % 50} t6 t7", max_tokens=2, lazy="paper"))
    before, os_before, rss_before = threading.active_count(), os_threads(), rss_mb()
    for i in range(500):
        body = chat(f"t{5 + i % 50} t6 t7", max_tokens=2, lazy="none" if i % 2 else "paper")
        assert post(server, body)[0] == 200
    assert wait_until(lambda: threading.active_count() <= before, 10)
    assert os_threads() <= os_before + 2
    assert rss_mb() < rss_before + 64, (rss_before, rss_mb())
