"""`lazyllm-mlx serve`, the HTTP side: an OpenAI-compatible API on stdlib's ThreadingHTTPServer.

POST /v1/chat/completions and /v1/completions (also without /v1), streaming as server-sent events;
GET /v1/models and /health. Every connection gets a thread, but one model serves them all, so
generations run one at a time (GenerationService's lock); /health and /v1/models answer meanwhile.
Bad requests get 4xx JSON errors and the server goes on serving. Listens on 127.0.0.1 by default.
"""

from __future__ import annotations

import json
import logging
import time
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

MAX_BODY_BYTES = 64 << 20
KEEPALIVE_SECONDS = 1.0
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

    def __init__(self, address: tuple[str, int], service: GenerationService, quiet: bool = False):
        super().__init__(address, APIHandler)
        self.service, self.quiet, self.started = service, quiet, int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class APIHandler(BaseHTTPRequestHandler):
    server: LazyServer
    server_version = "lazyllm-mlx"

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

    def do_POST(self) -> None:
        self._streaming = False
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in POST_ROUTES:
                raise RequestError(f"No such endpoint: POST {path}", 404, "not_found_error")
            request = parse_request(POST_ROUTES[path], self._read_body())
            tokens = self.server.service.prompt_tokens(request)
            self._complete(request, tokens)
        except RequestError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was closed and its cache kept
        except Exception as error:  # noqa: BLE001  (one failed request must not stop the server)
            _log.exception("request failed")
            self._error(RequestError(f"Internal error: {error}", 500, "server_error"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("A Content-Length header is required.", 411)
        try:
            size = int(length)
        except ValueError:
            raise RequestError(f"Invalid Content-Length header {length!r}.") from None
        if not 0 <= size <= MAX_BODY_BYTES:
            raise RequestError(f"The body must be at most {MAX_BODY_BYTES} bytes.", 413)
        return self.rfile.read(size)

    def _complete(self, request: CompletionRequest, tokens: list[int]) -> None:
        service = self.server.service
        model_id = service.model_id
        progress = self._keepalive if request.stream else None
        with service.start(request, tokens, progress) as generation:
            if request.stream:
                self._start_stream()
                for text in generation:
                    self._event(response_body(request, model_id, text, None))
                finish = generation.finish
                extra = {"lazyllm": finish.lazyllm()}
                self._event(response_body(request, model_id, "", finish.reason, extra))
                if request.include_usage:
                    self._event(usage_chunk(request, model_id, finish.usage()))
                self._write(b"data: [DONE]\n\n")
                return
            text = "".join(generation)
            finish = generation.finish
        extra = {"usage": finish.usage(), "lazyllm": finish.lazyllm()}
        self._json(200, response_body(request, model_id, text, finish.reason, extra))

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
        if self._streaming and time.monotonic() - self._last_write >= KEEPALIVE_SECONDS:
            self._last_write = time.monotonic()
            try:
                self._write(f": prefill {done}/{total}\n\n".encode())
            except OSError:
                pass  # noticed at the next token

    def _event(self, body: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(body)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._write(data)

    def _error(self, error: RequestError) -> None:
        try:
            if getattr(self, "_streaming", False):
                self._event(error.body())  # headers are out: the error becomes the last event
            else:
                self._json(error.status, error.body())
        except OSError:
            pass


def make_server(
    service: GenerationService, host: str = "127.0.0.1", port: int = 8080, quiet: bool = False
) -> LazyServer:
    """A server bound to host:port (port 0 picks a free one); call serve_forever() to run it."""
    return LazyServer((host, port), service, quiet)
