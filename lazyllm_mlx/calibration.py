"""Which schedule a preset is on a model: where a model's attention finds what a prompt asks for
is a property of the model, so `default`, `fast` and `safe` resolve to the model's own
calibration (`calibrate`), else one shipped for its architecture, else config.PRESETS."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlx.nn as nn

from . import calibration_store
from .calibration_store import PRESET_NAMES
from .config import LazyConfig
from .families import architecture_of

# What the `schedule:` line says of a model with no calibration: how to get one.
UNCALIBRATED = "generic layout: this model is not calibrated; `lazyllm-mlx calibrate` measures it"

SHIPPED = Path(__file__).parent / "calibrations" / "shipped.json"


def _shipped() -> dict[tuple, dict[str, str]]:
    """The calibrations shipped for the models we measured, by architecture (model type, layers,
    hidden size, query heads, KV heads): fine-tunes of a model share them. The data file says
    how each was made and names its evidence in benchmarks/."""
    data = json.loads(SHIPPED.read_text(encoding="utf-8"))
    return {tuple(c["architecture"]): dict(c["schedules"]) for c in data["calibrations"]}


CALIBRATED: dict[tuple, dict[str, str]] = _shipped()


def resolve_preset(config: LazyConfig, model: nn.Module) -> LazyConfig:
    """`config` as it applies to `model`: the presets `default`, `fast` and `safe` become, in this
    order, the model's own calibration (stored with it or in the user's store), the calibration
    shipped here for its architecture (CALIBRATED), or the generic layout of config.PRESETS; the
    options given after the preset (`default;norevive`) apply on top. `source` says which; a
    config that has one was resolved already and is returned as it is, so a request resolves
    its schedule once however many layers pass it on."""
    preset = config.from_preset
    if preset not in PRESET_NAMES or config.source is not None:
        return config
    own, shipped = calibration_store.find(model), CALIBRATED.get(tuple(architecture_of(model)))
    if own is not None:
        table, source = own.schedules, f"calibrated for this model ({own.origin})"
    elif shipped is not None:
        table, source = shipped, "shipped calibration"
    else:
        return replace(config, source=UNCALIBRATED)
    if preset == "fast" and "fast" not in table:
        preset = "default"  # nothing measured prunes harder: never slower than its default
    if preset not in table:  # e.g. `safe` where only `default` was measured
        return replace(config, source=f"generic layout: the {source} has no {preset!r}")
    text = ";".join([table[preset], *config.preset_options])
    parsed = LazyConfig.parse(text)
    return replace(parsed, name=config.name, from_preset=None, preset_options=(), source=source)
