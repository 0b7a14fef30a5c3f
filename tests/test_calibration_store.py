"""Where calibrations live and how a model finds its own: the fingerprint, the resolution order
(stored with the model, the user's store, shipped, generic), convert carrying one, bad files."""

from __future__ import annotations

import json

from lazyllm_mlx import LazyConfig, convert, load
from lazyllm_mlx.calibration import UNCALIBRATED
from lazyllm_mlx.calibration_store import (
    MODEL_FILE,
    Calibration,
    find,
    fingerprint,
    read,
    save_to_store,
    store_dir,
    write,
)
from lazyllm_mlx.cli import main
from lazyllm_mlx.generate import for_model
from lazyllm_mlx.loading import cast_floating

import mlx.core as mx
import pytest
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, tiny_model, tiny_tokenizer

WIDE = dict(hidden_size=128, intermediate_size=256)  # quantization groups divide it
MINE = {"default": "3:0.3;w=4;pool=3", "safe": "3:0.6;w=4"}


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYLLM_MLX_CALIBRATIONS", str(tmp_path / "store"))


@pytest.fixture
def folder(tmp_path):
    """A tiny llama saved as an HF folder."""
    path = tmp_path / "tiny"
    path.mkdir()
    save_model(path, tiny_model("llama", **WIDE))
    save_config({**COMMON, **FAMILY_CONFIGS["llama"], **WIDE}, path / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(path)
    return path


def calibration_for(model, schedules=MINE) -> Calibration:
    return Calibration(fingerprint(model), ("llama",), dict(schedules), command="test")


@pytest.mark.parametrize("stored", [mx.bfloat16, mx.float16])
def test_the_fingerprint_ignores_the_load_dtype_but_not_the_weights(stored):
    """Weights stored in half precision, loaded as stored (a Mac) or as float32 (our CPU)."""
    a, b = tiny_model("llama"), tiny_model("llama")
    cast_floating(a, stored)
    cast_floating(b, stored)
    cast_floating(b, mx.float32)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(tiny_model("llama", seed=1))  # a fine-tune
    quantized = tiny_model("llama", **WIDE)
    before = fingerprint(quantized)
    import mlx.nn as nn

    nn.quantize(quantized, group_size=64, bits=4)
    assert fingerprint(quantized) != before


def test_a_resolved_schedule_is_not_looked_up_again(folder, monkeypatch):
    """stream_generate, the server and the CLI pass resolved schedules on: resolving one again
    neither reads the store nor changes it."""
    from lazyllm_mlx import calibration_store

    model, _ = load(folder)
    generic = for_model("default", model)
    monkeypatch.setattr(calibration_store, "find", lambda model: pytest.fail("looked up again"))
    assert for_model(generic, model) is generic


def test_resolution_order_stored_with_the_model_then_the_store_then_shipped(folder, capsys):
    model, _ = load(folder)
    generic = for_model("default", model)
    assert generic.source == UNCALIBRATED and generic == LazyConfig.preset("default")
    in_store = {"default": "2:0.5;w=4", "safe": "2:0.8;w=4"}
    save_to_store(calibration_for(model, in_store))
    model, _ = load(folder)
    assert for_model("default", model) == LazyConfig.parse("2:0.5;w=4")
    assert "calibrated for this model" in for_model("safe", model).source
    write(calibration_for(model), folder / MODEL_FILE)  # beside config.json: it comes first
    model, _ = load(folder)
    resolved = for_model("default", model)
    assert resolved == LazyConfig.parse(MINE["default"]) and MODEL_FILE in resolved.source
    assert for_model("paper", model) == LazyConfig.preset("paper")  # not a calibrated preset
    save_to_store(calibration_for(model, {"default": "2:0.5;w=4"}))  # no `safe` measured
    (folder / MODEL_FILE).unlink()
    model, _ = load(folder)
    safe = for_model("safe", model)
    assert safe == LazyConfig.preset("safe") and "has no 'safe'" in safe.source
    assert for_model("4:0.5", model) == LazyConfig.parse("4:0.5")  # explicit schedules stay
    assert capsys.readouterr().err == ""


def test_the_default_model_runs_its_shipped_calibration_and_says_so(smollm2, capsys):
    model, _, _ = smollm2
    resolved = for_model("default", model)
    assert resolved.source == "shipped calibration" and resolved.boundaries[0] == 8
    code = main(["generate", "--prompt", "Hi", "--max-tokens", "1", "--verbose", "True"])
    assert code == 0
    assert "Schedule source: shipped calibration" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "damaged calibration file"),
        (b"\xff\xfe", "damaged calibration file"),
        (b'{"format": "something else"}', "not a calibration file"),
        (b'{"format": "lazyllm-mlx-calibration/1", "fingerprint": "x"}', "bad calibration fields"),
    ],
)
def test_a_damaged_file_says_one_line_and_falls_back(folder, capsys, content, message):
    (folder / MODEL_FILE).write_bytes(content)
    model, _ = load(folder)
    assert for_model("default", model) == LazyConfig.preset("default")  # the generic layout
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "ignoring it" in err[0]


def test_a_damaged_schedule_inside_is_refused(tmp_path):
    path = tmp_path / "c.json"
    bad = calibration_for(tiny_model("llama"), {"default": "3:2.5"}).to_dict()
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="out of range"):
        read(path)
    bad["schedules"] = {"fastest": "3:0.5"}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="no 'default' schedule"):
        read(path)


def test_a_calibration_made_for_another_model_is_never_applied(folder, capsys):
    other = calibration_for(tiny_model("llama", seed=5))
    write(other, folder / MODEL_FILE)
    model, _ = load(folder)
    store_dir().mkdir(parents=True)
    write(other, store_dir() / f"{fingerprint(model)}.json")  # renamed to look like ours
    assert find(model) is None and for_model("default", model).source == UNCALIBRATED
    err = capsys.readouterr().err
    assert err.count("was made for another model") == 2


def test_convert_carries_the_calibration_into_the_new_folder(folder, tmp_path):
    model, _ = load(folder)
    save_to_store(calibration_for(model))
    plain = convert(folder, tmp_path / "plain")
    carried = read(plain / MODEL_FILE)
    assert carried.schedules == MINE and carried.measured_on is None
    quantized = convert(folder, tmp_path / "q4", quantize=True, quality_check=False)
    carried = read(quantized / MODEL_FILE)
    assert carried.measured_on == fingerprint(model) != carried.fingerprint
    converted, _ = load(quantized)
    assert for_model("default", converted) == LazyConfig.parse(MINE["default"])
