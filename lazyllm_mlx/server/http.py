"""`lazyllm-mlx serve`, the HTTP side: an OpenAI-compatible API on stdlib's ThreadingHTTPServer.

POST /v1/chat/completions and /v1/completions (also without /v1), streaming as server-sent events;
GET /v1/models and /health. Every connection gets a thread that parses, tokenizes and writes;
one worker thread runs the model for them all, a request at a time (server/worker.py), so a
client that stops reading stalls only itself. /health and /v1/models answer meanwhile. Bad
requests get 4xx JSON errors and the server goes on serving; a generation whose client left, or
whose writes time out, stops at its next prefill chunk or token. Sockets time out after
`timeout` seconds without progress (headers, bodies, idle keep-alive, writes), and past
`max_connections` open connections a new one gets a 503. Listens on 127.0.0.1 by default; CORS
headers name the allowed origins (mlx-lm's `--allowed-origins`, default any) and OPTIONS
preflights are answered.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .protocol import (
    CompletionRequest,
    RequestError,
    parse_request,
    response_body,
    usage_chunk,
)
from .service import GenerationService
from .worker import GenerationWorker, Job, wait_event

MAX_BODY_BYTES = 64 << 20
KEEPALIVE_SECONDS = 1.0
GONE_CHECK_SECONDS = 0.2  # how often a plain request looks whether its client left
SOCKET_TIMEOUT = 30.0  # seconds a read or write may stall before the connection is dropped
MAX_CONNECTIONS = 64
POST_ROUTES = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "text",
    "/completions": "text",
}
_log = logging.getLogger("lazyllm_mlx.server")


class LazyServer(ThreadingHTTPServer):
    """The HTTP server, holding the GenerationService its handlers use."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        service: GenerationService | None,
        quiet: bool = False,
        allowed_origins: Sequence[str] = ("*",),
        timeout: float = SOCKET_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self._worker: GenerationWorker | None = None  # server_close runs if binding fails
        self._open, self._counting = 0, threading.Lock()
        super().__init__(address, APIHandler)
        self.service, self.quiet, self.started = service, quiet, int(time.time())
        self.allowed_origins = list(allowed_origins)
        self.socket_timeout, self.max_connections = timeout, max_connections

    @property
    def worker(self) -> GenerationWorker:
        """The generation thread, started with the first request (the service may be set
        after the port is bound)."""
        with self._counting:
            if self._worker is None:
                self._worker = GenerationWorker(self.service)
            return self._worker

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._counting:
            full = self._open >= self.max_connections
            self._open += 0 if full else 1
        if full:  # answered here, without a thread: a flood cannot grow the thread count
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._counting:
                self._open -= 1

    def server_close(self) -> None:
        super().server_close()
        if self._worker is not None:
            self._worker.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _refuse_busy(connection: socket.socket) -> None:
    body = json.dumps(RequestError("Too many open connections; retry later.", 503,
                                   "server_error").body()).encode()  # fmt: skip
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    try:
        connection.settimeout(1.0)
        connection.sendall(head.encode() + body)
    except OSError:
        pass


class APIHandler(BaseHTTPRequestHandler):
    server: LazyServer
    server_version = "lazyllm-mlx"
    _cors_sent = False

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # applied to the socket by StreamRequestHandler
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            model = {
                "id": self.server.service.model_id,
                "object": "model",
                "created": self.server.started,
                "owned_by": "lazyllm-mlx",
            }
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(RequestError(f"No such endpoint: GET {path}", 404, "not_found_error"))

    do_HEAD = do_GET  # the same headers, no body

    def do_OPTIONS(self) -> None:
        """A CORS preflight: which methods and headers a browser may send."""
        self.send_response(204)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        requested = self.headers.get("Access-Control-Request-Headers")
        self.send_header("Access-Control-Allow-Headers", requested or "Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self) -> None:
        if not self._cors_sent:
            self._cors_headers()
        self._cors_sent = False
        super().end_headers()

    def _cors_headers(self) -> None:
        headers = getattr(self, "headers", None)  # absent when the request line was bad
        allowed, origin = self.server.allowed_origins, headers and headers.get("Origin")
        if "*" in allowed:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self._cors_sent = True

    def do_PUT(self) -> None:
        self._method_not_allowed()

    do_DELETE = do_PATCH = do_PUT

    def _method_not_allowed(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        error = RequestError(f"Method {self.command} is not allowed on {path or '/'}", 405)
        self._error(error, {"Allow": "GET, POST, OPTIONS"})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own errors (bad request line, headers too large, unknown method) as
        JSON, like every other error here."""
        if code == 501 and getattr(self, "command", None):  # a method we have no handler for
            self._method_not_allowed()
            return
        kind = "server_error" if code >= 500 else "invalid_request_error"
        text = message or self.responses.get(code, ("Error",))[0]
        data = json.dumps(RequestError(text, code, kind).body()).encode()
        self.log_error("code %d, message %s", code, text)
        if self.request_version == "HTTP/0.9":  # a garbled request line: answer with a status
            self.request_version = "HTTP/1.0"
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code not in (204, 304):
            self.wfile.write(data)

    def do_POST(self) -> None:
        self._streaming = False
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in POST_ROUTES:
                self._drain()
                raise RequestError(f"No such endpoint: POST {path}", 404, "not_found_error")
            request = parse_request(POST_ROUTES[path], self._read_body())
            self._check_model(request)
            tokens = self.server.service.prompt_tokens(request)
            self._complete(request, tokens)
        except RequestError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was closed and its cache kept
        except Exception as error:  # noqa: BLE001  (one failed request must not stop the server)
            _log.exception("request failed")
            self._error(RequestError(f"Internal error: {error}", 500, "server_error"))

    def _check_model(self, request: CompletionRequest) -> None:
        """The server serves one model: a request naming another gets a 404, never a silent
        substitute (the served model is named as /v1/models lists it, or by its path's name)."""
        served = self.server.service.model_id
        if request.model is None or request.model in (served, served.rstrip("/").split("/")[-1]):
            return
        raise RequestError(
            f"The model {request.model!r} does not exist here: this server serves {served!r} "
            "(GET /v1/models).", 404, "invalid_request_error", param="model",
            code="model_not_found",
        )  # fmt: skip

    def _drain(self) -> None:
        """Read a body nobody will use: closing a socket with unread data resets the
        connection, and the client could lose the error response."""
        try:
            self._read_body()
        except RequestError:
            pass

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("A Content-Length header is required.", 411)
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            raise RequestError(
                f"Invalid Content-Length header {length!r}: expected a byte count >= 0."
            )
        if size > MAX_BODY_BYTES:
            raise RequestError(f"The body must be at most {MAX_BODY_BYTES} bytes.", 413)
        body = self.rfile.read(size)
        if len(body) < size:
            raise RequestError(f"The body ended after {len(body)} of {size} bytes.")
        return body

    def _complete(self, request: CompletionRequest, tokens: list[int]) -> None:
        job = self.server.worker.submit(request, tokens)
        try:
            if request.stream:
                self._stream(job)
            else:
                self._answer(job)
        except OSError:  # a write failed or timed out: the client is gone or not reading
            job.cancel()
            raise

    def _events(self, job: Job) -> Iterator[tuple[Any, ...]]:
        """The job's events up to its last. A stream idle for KEEPALIVE_SECONDS gets a comment (a
        failed write ends it); a plain request, which writes nothing until the end, looks every
        GONE_CHECK_SECONDS whether its client left, and cancels the job if it did."""
        wait = KEEPALIVE_SECONDS if self._streaming else GONE_CHECK_SECONDS
        looked = time.monotonic()
        while True:
            event = wait_event(job, wait)
            if self._streaming and event is None:
                self._write(b": waiting\n\n")
            elif not self._streaming and time.monotonic() - looked >= GONE_CHECK_SECONDS:
                looked = time.monotonic()
                if self._client_gone():
                    job.cancel()
            if event is None:
                continue
            yield event
            if event[0] in ("finish", "cancelled", "error"):
                return

    def _stream(self, job: Job) -> None:
        request, model_id = job.request, self.server.service.model_id
        self._start_stream()
        first = True  # only the first chat chunk names the role, as OpenAI's
        for kind, *value in self._events(job):
            if kind == "progress":
                self._keepalive(*value)
            elif kind == "text":
                text, logprobs = value
                self._event(response_body(request, model_id, text, None, None, logprobs, first))
                first = False
            elif kind == "finish":
                finish, logprobs = value
                extra = {"lazyllm": finish.lazyllm()}
                body = response_body(request, model_id, "", finish.reason, extra, logprobs, first)
                self._event(body)
                if request.include_usage:
                    self._event(usage_chunk(request, model_id, finish.usage()))
                self._write(b"data: [DONE]\n\n")
            elif kind == "error":
                self._error(value[0])

    def _answer(self, job: Job) -> None:
        pieces, finish = [], None
        for kind, *value in self._events(job):
            if kind == "text":
                pieces.append(value[0])
            elif kind == "finish":
                finish = value[0]
            elif kind == "error":
                raise value[0]
        if finish is None or finish.reason == "cancelled":
            return  # nobody is waiting for the answer
        extra = {"usage": finish.usage(), "lazyllm": finish.lazyllm()}
        body = response_body(job.request, self.server.service.model_id, "".join(pieces),
                             finish.reason, extra, finish.logprobs)  # fmt: skip
        self._json(200, body)

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (an end of stream waits to be read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._streaming = True
        self._last_write = time.monotonic()

    def _keepalive(self, done: int, total: int) -> None:
        """Prefill progress as SSE comments (at most one a second): clients waiting on a long
        prompt see the connection alive."""
        if time.monotonic() - self._last_write >= KEEPALIVE_SECONDS:
            self._last_write = time.monotonic()
            self._write(f": prefill {done}/{total}\n\n".encode())

    def _event(self, body: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(body)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)

    def _error(self, error: RequestError, headers: dict[str, str] | None = None) -> None:
        try:
            if getattr(self, "_streaming", False):
                self._event(error.body())  # headers are out: the error becomes the last event
            else:
                self._json(error.status, error.body(), headers)
        except OSError:
            pass


def make_server(
    service: GenerationService | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    quiet: bool = False,
    allowed_origins: Sequence[str] = ("*",),
    timeout: float = SOCKET_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> LazyServer:
    """A server bound to host:port (port 0 picks a free one); call serve_forever() to run it.

    service may be set later (`server.service = ...`), before serve_forever: the port is then
    taken before a model is loaded. A port in use raises OSError."""
    return LazyServer((host, port), service, quiet, allowed_origins, timeout, max_connections)
