"""Loaded GGUF weights kept in the user's cache folder, so that a second load takes seconds.

Dequantizing a GGUF file runs in Python (gguf-py): ~50 s for a 1.5B Q4_K_M on our CPU. The
weights exactly as `load_gguf` built them (dequantized, or MLX-quantized on the GPU path) are
saved once as safetensors under `<cache folder>/gguf/`, and read back by later loads.

An entry is keyed by the file's identity (resolved path, device and inode, size, modification
time, a hash of its first and last MiB) and by how it was loaded (dtype, quantized or not, config
overrides, this format's version), so a changed file or option never meets a stale entry. Entries
are written to a temporary file renamed into place (a crash leaves no half entry); an entry that
does not load is deleted and rebuilt from the GGUF file; entries of files that changed or are
gone are deleted whenever a new one is written. `LAZYLLM_MLX_GGUF_CACHE=0` turns the cache off;
the folder is `$LAZYLLM_MLX_CACHE`, else `$XDG_CACHE_HOME/lazyllm-mlx` (`~/.cache/lazyllm-mlx`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..default_model import default_cache_dir
from ..safetensors_file import check_safetensors

VERSION = 1  # raise when what load_gguf builds from the same file changes
_SAMPLE = 1 << 20
_ABANDONED = 3600  # seconds after which a temporary folder is a crash's leftover
_SOURCE = "source.json"
_WEIGHTS = "weights.safetensors"


def enabled() -> bool:
    return os.environ.get("LAZYLLM_MLX_GGUF_CACHE", "1").strip().lower() not in ("0", "off", "no")


def folder() -> Path:
    return default_cache_dir() / "gguf"


def identity(path: Path) -> dict[str, Any]:
    """What tells this file from any other, or from itself after a change."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(0, stat.st_size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return dict(
        path=str(path.resolve()),
        device=stat.st_dev,
        inode=stat.st_ino,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        sample=digest.hexdigest(),
    )


def entry(path: Path, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The entry folder for `path` loaded with `options`, and the source record it holds."""
    source = dict(identity(path), options=options, version=VERSION)
    key = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()
    return folder() / key[:32], source


def load(path: Path, options: dict[str, Any]) -> dict[str, mx.array] | None:
    """The cached weights of `path` with `options`, or None (no entry, or one that is broken)."""
    place, source = entry(path, options)
    weights_file = place / _WEIGHTS
    if not weights_file.is_file():
        return None
    try:
        if json.loads((place / _SOURCE).read_text()) != source:
            raise ValueError("its source record differs")
        check_safetensors(weights_file)
        weights = mx.load(str(weights_file))
        # Read now: a lazy load belongs to this thread's stream, and the model may run in
        # another (the server's request threads); a read error also surfaces here.
        mx.eval(weights)
        return weights
    except Exception as error:  # noqa: BLE001  (anything wrong: rebuild from the GGUF file)
        _warn(f"dropping the unreadable cached weights of {path.name} ({error}); rebuilding")
        shutil.rmtree(place, ignore_errors=True)
        return None


def save(path: Path, options: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Keep `weights` for the next load; a failure (disk full, read-only) only costs that."""
    place, source = entry(path, options)
    try:
        place.parent.mkdir(parents=True, exist_ok=True)
        _prune(place.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{place.name}.", dir=place.parent))
        try:
            mx.save_safetensors(str(staging / _WEIGHTS), weights)
            (staging / _SOURCE).write_text(json.dumps(source, sort_keys=True, default=str))
            shutil.rmtree(place, ignore_errors=True)
            os.rename(staging, place)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, RuntimeError, ValueError) as error:
        _warn(f"could not cache the loaded weights of {path.name} in {place.parent}: {error}")


def _prune(root: Path) -> None:
    """Delete entries whose GGUF file is gone or changed since (and leftovers of crashes)."""
    for place in root.iterdir():
        if place.name.startswith("."):  # another load may be writing it right now
            if time.time() - place.stat().st_mtime > _ABANDONED:
                shutil.rmtree(place, ignore_errors=True)
            continue
        try:
            source = json.loads((place / _SOURCE).read_text())
            current = identity(Path(source["path"]))
            stale = any(source[k] != current[k] for k in current) or source["version"] != VERSION
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            shutil.rmtree(place, ignore_errors=True)


def _warn(message: str) -> None:
    print(f"[lazyllm-mlx] {message}", file=sys.stderr)
