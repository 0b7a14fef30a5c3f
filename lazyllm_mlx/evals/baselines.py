"""Baseline outcomes of `lazyllm-mlx eval` kept on disk, so each new schedule costs only its runs.

An outcome is keyed by the model's fingerprint, the prompt's tokens and the decode budget: a
baseline run is deterministic (greedy), so a stored one stands for a fresh one, except for its
TTFT, which was measured in an earlier run (the report says how many prompts reused one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..fingerprint import model_fingerprint
from ..output_files import write_atomically
from .tasks import Task


class BaselineStore:
    def __init__(self, folder: str | Path, model: Any):
        self.folder = Path(folder).expanduser()
        self.model_id = model_fingerprint(model)

    def _path(self, task: Task) -> Path:
        key = json.dumps([self.model_id, task.max_tokens, task.tokens]).encode()
        return self.folder / f"{hashlib.sha256(key).hexdigest()[:32]}.npz"

    def get(self, task: Task) -> dict[str, Any] | None:
        """The stored outcome's fields, or None when absent or unreadable (then it is re-run)."""
        path = self._path(task)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return dict(
                    tokens=data["tokens"].tolist(),
                    text=str(data["text"]),
                    ttft=float(data["ttft"]),
                    logprobs=data["logprobs"],
                )
        except (OSError, KeyError, ValueError):
            return None

    def put(self, task: Task, tokens: list[int], text: str, ttft: float, logprobs) -> None:
        """Write atomically: a concurrent or interrupted run never leaves a partial file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            tokens=np.array(tokens, dtype=np.int64),
            text=np.array(text),
            ttft=np.array(ttft),
            logprobs=np.asarray(logprobs, dtype=np.float32),
        )
        # np.savez appends ".npz" to a name without it
        write_atomically(self._path(task), lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
