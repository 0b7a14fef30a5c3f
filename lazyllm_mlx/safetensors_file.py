"""A safetensors file checked before MLX reads it: a damaged header or a truncated file becomes
a ValueError naming the file (what model loading, cached GGUF weights and prompt caches share)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def check_safetensors(file: Path) -> None:
    """Raise ValueError naming `file` if its header is unreadable or its tensors overrun it."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n > size - 8:
            raise ValueError(f"{file}: corrupt safetensors file (header length {n}, size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors file (header: {e})") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if max(ends, default=0) > size - 8 - n:
        raise ValueError(f"{file}: truncated safetensors file ({size} bytes, data needs more)")
