"""The GGUF load cache: a second load reads the weights it kept, a changed file or option never
meets a stale entry, a broken entry is rebuilt."""

from __future__ import annotations

import os
import threading
import time

import lazyllm_mlx
from lazyllm_mlx.gguf import load_cache, loader
from lazyllm_mlx.gguf.loader import load_gguf

import mlx.core as mx
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf
from mlx.utils import tree_flatten

PROMPT = mx.array([[5, 9, 12, 30, 7, 8, 21, 22]])
TYPES = {"attn_q": Q.Q4_0, "ffn_down": Q.Q4_K, "token_embd": Q.Q8_0}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYLLM_MLX_GGUF_CACHE", "1")
    monkeypatch.setenv("LAZYLLM_MLX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def entries(cache_dir) -> list:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def no_dequantizing(monkeypatch):
    def refuse(*args):
        raise AssertionError("the GGUF tensors were read again")

    monkeypatch.setattr(loader, "read_tensor", refuse)


def same_parameters(a, b) -> bool:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["cpu", "gpu-policy"])
def test_the_second_load_reads_the_cached_weights(tmp_path, cache_dir, monkeypatch, dtype):
    tiny = write_tiny_gguf(tmp_path / "m.gguf", types=TYPES)
    first, _ = load_gguf(tiny.path, dtype)
    assert len(entries(cache_dir)) == 1
    with monkeypatch.context() as patch:
        no_dequantizing(patch)
        second, _ = load_gguf(tiny.path, dtype)
    assert same_parameters(first, second)
    assert mx.array_equal(first(PROMPT), second(PROMPT)).item()


def test_cached_weights_run_in_another_thread(tmp_path, cache_dir):
    """The server loads in its main thread and generates in a request's thread."""
    tiny = write_tiny_gguf(tmp_path / "m.gguf", types=TYPES)
    load_gguf(tiny.path, mx.float32)
    model, _ = load_gguf(tiny.path, mx.float32)  # from the cache
    results = []
    thread = threading.Thread(target=lambda: results.append(model(PROMPT).sum().item()))
    thread.start()
    thread.join()
    assert len(results) == 1


def test_options_and_changed_files_get_their_own_entries(tmp_path, cache_dir):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, types=TYPES)
    load_gguf(path, mx.float32)
    load_gguf(path, mx.float16)  # quantized: another entry
    assert len(entries(cache_dir)) == 2
    before = entries(cache_dir)
    changed = write_tiny_gguf(path, types=TYPES, seed=5)  # the same path, other weights
    model, _ = load_gguf(path, mx.float32)
    reference = changed.reference_model()
    assert mx.abs(model(PROMPT) - reference(PROMPT)).max().item() < 1e-5
    assert len(set(entries(cache_dir)) - set(before)) == 1
    assert len(entries(cache_dir)) == 1  # both entries of the old file were pruned


def test_a_broken_entry_is_rebuilt(tmp_path, cache_dir, capsys):
    tiny = write_tiny_gguf(tmp_path / "m.gguf", types=TYPES)
    load_gguf(tiny.path, mx.float32)
    (entry,) = cache_dir.iterdir()
    weights = entry / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model, _ = load_gguf(tiny.path, mx.float32)
    assert "dropping the unreadable cached weights" in capsys.readouterr().err
    assert mx.abs(model(PROMPT) - tiny.reference_model()(PROMPT)).max().item() < 1e-5
    assert weights.stat().st_size > 0 and len(entries(cache_dir)) == 1  # rebuilt


def test_entries_of_deleted_files_and_crash_leftovers_are_pruned(tmp_path, cache_dir):
    gone = write_tiny_gguf(tmp_path / "gone.gguf", types=TYPES)
    load_gguf(gone.path, mx.float32)
    leftover = cache_dir / ".abandoned.partial"
    leftover.mkdir()
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    os.remove(gone.path)
    kept = write_tiny_gguf(tmp_path / "kept.gguf", types=TYPES)
    load_gguf(kept.path, mx.float32)
    (entry,) = entries(cache_dir)
    assert "kept.gguf" in (cache_dir / entry / "source.json").read_text()


def test_off_by_environment_and_for_convert(tmp_path, cache_dir, monkeypatch):
    tiny = write_tiny_gguf(tmp_path / "m.gguf", types=TYPES)
    monkeypatch.setenv("LAZYLLM_MLX_GGUF_CACHE", "0")
    load_gguf(tiny.path, mx.float32)
    assert entries(cache_dir) == []
    monkeypatch.setenv("LAZYLLM_MLX_GGUF_CACHE", "1")
    lazyllm_mlx.convert(tiny.path, tmp_path / "out")
    assert entries(cache_dir) == []


def test_an_unwritable_cache_folder_only_costs_the_cache(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LAZYLLM_MLX_GGUF_CACHE", "1")
    monkeypatch.setenv("LAZYLLM_MLX_CACHE", str(blocker))
    tiny = write_tiny_gguf(tmp_path / "m.gguf", types=TYPES)
    model, _ = load_gguf(tiny.path, mx.float32)
    assert "could not cache the loaded weights" in capsys.readouterr().err
    assert mx.abs(model(PROMPT) - tiny.reference_model()(PROMPT)).max().item() < 1e-5
    assert load_cache.folder() == blocker / "gguf"
