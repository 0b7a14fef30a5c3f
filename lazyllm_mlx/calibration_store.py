"""Calibrations made by `lazyllm-mlx calibrate`: where they are kept and how a model finds its own.

A calibration is a small JSON file: the schedules it chose (`default`, `safe`, ...), the model's
fingerprint and architecture, the command that made it and the evidence behind it. It is found,
in this order, beside the model's config.json (`convert` writes it there) or in the user's store
(`$LAZYLLM_MLX_CALIBRATIONS`, else `$XDG_CACHE_HOME/lazyllm-mlx/calibrations`, else
`~/.cache/lazyllm-mlx/calibrations`), named by the fingerprint. A file made for another model is
never applied, and a damaged one is skipped with one warning line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from .config import LazyConfig
from .fingerprint import model_fingerprint
from .output_files import write_json

FORMAT = "lazyllm-mlx-calibration/1"
MODEL_FILE = "lazyllm_calibration.json"  # beside a model folder's config.json
PRESET_NAMES = ("default", "fast", "safe")
ENVIRONMENT = "LAZYLLM_MLX_CALIBRATIONS"


@dataclass
class Calibration:
    """Schedules measured for one model (by fingerprint), with what they were chosen on."""

    fingerprint: str
    architecture: tuple
    schedules: dict[str, str]
    model: str = ""
    command: str = ""
    created: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    measured_on: str | None = None  # the fingerprint measured, where it differs (convert -q)
    origin: str = field(default="", compare=False)  # where it was read from; not stored

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["origin"]
        d["architecture"] = list(self.architecture)
        return dict(format=FORMAT, **d)

    @classmethod
    def from_dict(cls, d: Any, origin: str = "") -> Calibration:
        """Raises ValueError (one line) on anything but a calibration this version can apply."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a calibration file (format {found!r}, expected {FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            calibration = cls(**d, origin=origin)
        except TypeError as error:
            raise ValueError(f"bad calibration fields: {error}") from None
        schedules = calibration.schedules
        if not isinstance(schedules, dict) or "default" not in schedules:
            raise ValueError("the calibration has no 'default' schedule")
        for name, text in schedules.items():
            if name not in PRESET_NAMES or not isinstance(text, str):
                raise ValueError(f"bad schedule entry {name!r}")
            LazyConfig.parse(text)  # raises on a damaged schedule string
        calibration.architecture = tuple(calibration.architecture)
        return calibration


def store_dir() -> Path:
    """The user's calibration store (not created here)."""
    if os.environ.get(ENVIRONMENT):
        return Path(os.environ[ENVIRONMENT]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "lazyllm-mlx" / "calibrations"


def fingerprint(model: nn.Module) -> str:
    """The model's weights and architecture, whatever dtype they were loaded in: a fine-tune or
    a quantization of one architecture has another fingerprint, a float16 or float32 load not."""
    return model_fingerprint(model, dtypes=False)


def read(path: str | Path) -> Calibration:
    """The calibration in `path`; ValueError or OSError with one line on anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: damaged calibration file ({error})") from None
    try:
        return Calibration.from_dict(data, origin=str(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def write(calibration: Calibration, path: str | Path) -> Path:
    return write_json(path, calibration.to_dict())


def save_to_store(calibration: Calibration, model: nn.Module | None = None) -> Path:
    """Write `calibration` into the user's store, replacing this model's previous one; with
    `model`, that model object uses it from now on."""
    folder = store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = write(calibration, folder / f"{calibration.fingerprint}.json")
    calibration.origin = str(path)
    if model is not None:
        object.__setattr__(model, "_lazyllm_calibration", calibration)
    return path


def find(model: nn.Module) -> Calibration | None:
    """The model's own calibration: beside its folder's config.json, else in the user's store;
    None when there is none it can use (a damaged or foreign file says so on stderr once).
    Looked up once per model object."""
    held = getattr(model, "_lazyllm_calibration", False)
    if held is not False:
        return held
    found = _lookup(model)
    object.__setattr__(model, "_lazyllm_calibration", found)  # not a parameter or child module
    return found


def _lookup(model: nn.Module) -> Calibration | None:
    folder = getattr(model, "lazyllm_folder", None)
    candidates = [Path(folder) / MODEL_FILE] if folder is not None else []
    wanted = fingerprint(model)
    candidates.append(store_dir() / f"{wanted}.json")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            calibration = read(path)
        except (OSError, ValueError) as error:
            _warn(f"{error}; ignoring it")
            continue
        if calibration.fingerprint != wanted:
            _warn(f"{path} was made for another model (fingerprint {calibration.fingerprint}, "
                  f"this one {wanted}); ignoring it")  # fmt: skip
            continue
        return calibration
    return None


def _warn(message: str) -> None:
    print(f"lazyllm-mlx: warning: {message}", file=sys.stderr)
