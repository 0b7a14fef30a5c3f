"""Fuzzing kept at a size CI affords (fixed seeds): mutated GGUF files and prompt-cache files load
or are refused with a ValueError, never a crash, another exception or a hang; malformed server
requests are answered 4xx with a JSON error."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lazyllm_mlx import load_lazy_cache, make_lazy_cache, save_lazy_cache, stream_generate
from lazyllm_mlx.gguf.loader import load_gguf
from lazyllm_mlx.gguf.reader import read_header
from lazyllm_mlx.server import GenerationService, make_server

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tiny_models import random_prompt, tiny_model, tiny_tokenizer

GGUF_FILES = 1000
CACHE_FILES = 1000
MLX_LM_CACHE_FILES = 200
SERVER_REQUESTS = 1000
SECONDS_PER_CASE = 10  # a case taking longer is a hang


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def hang(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: np.random.Generator, region: int) -> bytes:
    """One of: bit flips, random bytes, an extreme 4/8-byte integer, a cut, a removed or repeated
    span; all but the cut within the first `region` bytes."""
    buf = bytearray(data)
    kind = rng.integers(6)
    at = int(rng.integers(0, region))
    if kind == 0:
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(0, region))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(0, region))] = int(rng.choice([0, 0xFF, rng.integers(256)]))
    elif kind == 2:
        width = int(rng.choice([4, 8]))
        value = int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 7, 1 << 40]))
        buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    elif kind == 3:
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    elif kind == 4:
        del buf[at : at + int(rng.integers(1, 16))]
    else:
        span = buf[at : at + int(rng.integers(1, 16))]
        buf[at:at] = span
    return bytes(buf)


def fuzz_files(
    original: Path, count: int, seed: int, region: int, load: Callable[[Path], object]
) -> Counter:
    """Load `count` mutations of `original`; returns the outcomes (loaded / refused)."""
    rng = np.random.default_rng(seed)
    data = original.read_bytes()
    mutated = original.with_name("mutated" + original.suffix)
    outcomes: Counter = Counter()
    for case in range(count):
        mutated.write_bytes(mutate(data, rng, region))
        try:
            with deadline(SECONDS_PER_CASE):
                load(mutated)
            outcomes["loaded"] += 1
        except (ValueError, FileNotFoundError):
            outcomes["refused"] += 1
        except Exception as error:  # noqa: BLE001  (anything else is the failure sought)
            pytest.fail(f"case {case} (seed {seed}): {type(error).__name__}: {error}")
    return outcomes


@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::UserWarning"
)  # garbage in, noise out
def test_mutated_gguf_files_load_or_are_refused(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=1,
                           types={"attn_q": Q.Q8_0, "ffn_down": Q.Q4_K})  # fmt: skip
    data_start = min(info.offset for info in read_header(tiny.path).tensors.values())
    outcomes = fuzz_files(
        tiny.path, GGUF_FILES, seed=14, region=data_start,
        load=lambda path: load_gguf(path, mx.float32, cache=False),
    )  # fmt: skip
    assert sum(outcomes.values()) == GGUF_FILES
    assert outcomes["refused"] > GGUF_FILES // 4 and outcomes["loaded"] > 0, outcomes


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_mutated_prompt_cache_files_load_or_are_refused(model, tmp_path):
    cache = make_lazy_cache(model, "paper")
    for _ in stream_generate(model, tiny_tokenizer(), random_prompt(80), 2, lazy="paper",
                             prompt_cache=cache):  # fmt: skip
        pass
    path = tmp_path / "lazy.safetensors"
    save_lazy_cache(path, cache, model, {"document": "d"})
    outcomes = fuzz_files(
        path, CACHE_FILES, seed=15, region=path.stat().st_size,
        load=lambda p: load_lazy_cache(p, model),
    )  # fmt: skip
    # Only a mutation that changes nothing (a header's padding, say) may load.
    assert outcomes["refused"] >= CACHE_FILES * 0.95, outcomes


def test_mutated_mlx_lm_prompt_cache_files_load_or_are_refused(model, tmp_path):
    caches = make_prompt_cache(model)
    model(random_prompt(40)[None], cache=caches)
    path = tmp_path / "mlx-lm.safetensors"
    save_prompt_cache(str(path), caches, {"model": "x"})
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    outcomes = fuzz_files(
        path, MLX_LM_CACHE_FILES, seed=16, region=header, load=lambda p: load_lazy_cache(p, model)
    )
    assert outcomes["refused"] > 0, outcomes


# --- the server --------------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}t2 {% else %}t3 {% endif %}"
    "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
)
VALID = {"messages": [{"role": "user", "content": "t5 t6 t7"}], "max_tokens": 2}
# Values each field refuses (None is absent, which is valid, so never here).
BAD_VALUES: dict[str, list] = {
    "messages": [
        [],
        "t5",
        5,
        {},
        [5],
        [{"content": "t5"}],
        [{"role": 1}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "x"}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": "\ud800"}],
    ],
    "max_tokens": [0, -1, 1.5, "2", True, [], {}, 10**5000],
    "max_completion_tokens": [0, -5, "x", 2.5],
    "temperature": [-1, "hot", [], float("inf"), float("nan"), True, 10**400, -(10**400)],
    "top_p": [-0.1, 1.5, "x", float("nan")],
    "top_k": [-1, 2.5, "3", False],
    "min_p": [-1, 2, "0.1"],
    "repetition_penalty": [-2, "x", float("inf")],
    "repetition_context_size": [0, -1, 2.5],
    "logprobs": ["yes", 2, -1, [], 1.5],
    "top_logprobs": [-1, 99, "3", 1.5],
    "stop": [5, [1], [None], {"a": 1}],
    "stream": ["yes", 1, []],
    "stream_options": ["x", 5, []],
    "seed": [-1, 2**70, "7", 1.5],
    "n": [2, 0, "1"],
    "lazy": [
        5,
        [],
        True,
        "bogus",
        "",
        "40:0.5",
        {"keep": [9]},
        "2:inf",
        "2:1e30",
        "\uff12:0.5",
        {"pool": 3.0},
        {"window": 2.5},
        {"revive_cap": 0.5},
        {"boundaries": [2], "keep": ["0.5"]},
        {"boundaries": [2], "keep": [1e30]},
        {"revive": 1},
        {"sink": -1},
        {"heads": "min"},
        {"unknown": 1},
    ],  # fmt: skip
    "model": [5, [], {}],
    "chat_template_kwargs": ["x", 5, [], {"chat_template": "{{ 1 }}"}, {"tokenize": True}],
}


def dump_huge(body: dict) -> bytes:
    """JSON with NaN and integers of any length (the server must refuse both)."""
    if not hasattr(sys, "get_int_max_str_digits"):  # Pythons without the limit
        return json.dumps(body, allow_nan=True).encode()
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(body, allow_nan=True).encode()
    finally:
        sys.set_int_max_str_digits(limit)


def malformed_requests(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """(kind, raw HTTP request) pairs, each a request the server must refuse."""
    rng = np.random.default_rng(seed)
    fields = sorted(BAD_VALUES)
    kinds = ["field"] * 6 + ["json", "length", "path", "method", "line", "prompt"]
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        path, method, headers = "/v1/chat/completions", "POST", {}
        if kind == "field":
            body = dict(VALID)
            for name in rng.choice(fields, int(rng.integers(1, 3)), replace=False):
                values = BAD_VALUES[name]
                body[name] = values[int(rng.integers(len(values)))]
            raw = dump_huge(body)
        elif kind == "prompt":
            path = "/v1/completions"
            bad = ["", [], [-1], [1.5], ["a", "b"], {}, 5, [999999], None]
            prompt = bad[int(rng.integers(len(bad)))]
            raw = json.dumps({} if prompt is None else {"prompt": prompt}).encode()
        elif kind == "json":
            text = json.dumps(VALID).encode()
            raw = text[: int(rng.integers(0, len(text) - 1))] + bytes(
                rng.integers(0, 256, int(rng.integers(0, 4)), dtype=np.uint8)
            )
            try:
                if isinstance(json.loads(raw), dict):
                    raw = b"{" + raw  # it happened to stay an object: break it
            except (ValueError, UnicodeDecodeError):
                pass
        elif kind == "length":
            raw = json.dumps(VALID).encode()
            choices = ["-5", "abc", "", "1e3", str(2**40), "-0x10"]
            headers["Content-Length"] = choices[int(rng.integers(len(choices)))]
        elif kind == "path":
            path = ["/v1/embeddings", "/", "/v2/chat", "/v1/chat/completions/x"][
                int(rng.integers(4))
            ]
            raw = json.dumps(VALID).encode()
        elif kind == "method":
            method = ["PUT", "DELETE", "PATCH"][int(rng.integers(3))]
            raw = json.dumps(VALID).encode()
        else:
            # (HTTP/2.0 and above are not malformed: HTTP's answer to them is 505.)
            lines = [b"GARBAGE\r\n\r\n", b"POST\r\n\r\n", b"POST /v1/completions HTTP/x\r\n\r\n",
                     b"POST /v1/completions HTTP/1.1 extra\r\n\r\n"]  # fmt: skip
            yield kind, lines[int(rng.integers(len(lines)))]
            continue
        headers.setdefault("Content-Length", str(len(raw)))
        head = f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        yield kind, head.encode() + b"\r\n" + raw


def answer(address: tuple[str, int], request: bytes) -> tuple[int, dict]:
    import http.client

    with socket.create_connection(address, timeout=SECONDS_PER_CASE) as sock:
        sock.sendall(request)  # (no half-close: the server takes one for a client gone)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read() or b"null")


def test_malformed_server_requests_are_answered_4xx(model):
    hf = tiny_tokenizer()._tokenizer
    hf.chat_template = TEMPLATE
    service = GenerationService(model, TokenizerWrapper(hf), lazy=None, model_id="tiny")
    server = make_server(service, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    statuses: Counter = Counter()
    try:
        for i, (kind, request) in enumerate(malformed_requests(SERVER_REQUESTS, seed=17)):
            status, body = answer(server.server_address[:2], request)
            assert 400 <= status < 500, (i, kind, request[:300], status, body)
            assert isinstance(body, dict) and body["error"]["message"], (i, kind, body)
            statuses[status] += 1
        assert sum(statuses.values()) == SERVER_REQUESTS
        ok = json.dumps(VALID).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(ok)}\r\n\r\n"
        assert answer(server.server_address[:2], head.encode() + ok)[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()
