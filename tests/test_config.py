"""LazyConfig: presets, the one-line syntax, validation, resolution and the prefill arithmetic."""

from dataclasses import replace

from lazyllm_mlx import LazyConfig, default_schedule
from lazyllm_mlx.config import PRESETS, Schedule, as_config
from lazyllm_mlx.generate import resolve_schedule

import pytest
from tiny_models import tiny_model


def test_presets():
    paper = LazyConfig.preset("paper")
    assert paper.resolve(30) == Schedule(30, (9, 18, 27), (0.7, 0.7, 0.7))
    assert LazyConfig.preset("none").resolve(30).boundaries == ()
    assert LazyConfig.preset("default").min_prompt_tokens > 0
    safe, default = LazyConfig.preset("safe").resolve(18), LazyConfig.preset("default").resolve(18)
    assert safe.boundaries == default.boundaries
    assert safe.prefill_fraction(4096) > default.prefill_fraction(4096)
    # budgets: the kept share falls as prompts grow
    assert default.prefill_fraction(2048) > default.prefill_fraction(4096) > 0.5
    with pytest.raises(ValueError, match="Unknown LazyLLM preset 'fastest'"):
        LazyConfig.preset("fastest")


def test_every_calibration_is_a_valid_schedule_ordered_by_how_hard_it_prunes():
    from lazyllm_mlx.calibration import CALIBRATED

    assert CALIBRATED  # the real models we measure have theirs
    for (model_type, layers, *_), table in CALIBRATED.items():
        assert set(table) <= set(PRESETS) - {"none", "paper"}, model_type
        configs = {name: LazyConfig.parse(text) for name, text in table.items()}
        fraction = {n: c.resolve(layers).prefill_fraction(2048) for n, c in configs.items()}
        order = [n for n in ("fast", "default", "safe") if n in fraction]
        assert [fraction[n] for n in order] == sorted(fraction[n] for n in order), model_type
        assert all(c.min_prompt_tokens >= 256 and c.revive for c in configs.values())


def test_every_shipped_calibration_names_its_evidence():
    import json
    from pathlib import Path

    from lazyllm_mlx.calibration import SHIPPED

    benchmarks = Path(__file__).parent.parent / "benchmarks"
    for entry in json.loads(SHIPPED.read_text())["calibrations"]:
        assert entry["model"] and entry["made_by"] and entry["notes"]
        assert entry["evidence"] and all((benchmarks / f).is_file() for f in entry["evidence"])


def test_one_line_syntax_round_trips():
    texts = ["0.3:0.7,0.6:0.5", "9:0.7,18:0.5;min=512", "4:0.5;norevive;random", "none"]
    for text in [
        *texts,
        "8:0.4,18:0.5;w=64;pool=13;heads=max;sink=4;revive=0.25;margin=0.5;cap=8;every=4",
    ]:
        config = LazyConfig.parse(text)
        assert LazyConfig.parse(config.to_string()) == config
    config = LazyConfig.parse("9:0.7,18:0.5;min=512;norevive")
    assert config.boundaries == (9, 18) and config.keep == (0.7, 0.5)
    assert config.min_prompt_tokens == 512 and not config.revive
    assert LazyConfig.from_dict(config.to_dict()) == config
    assert as_config("paper") == LazyConfig.preset("paper") and as_config(None) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(boundaries=(3,), keep=(0.0,)), "out of range"),
        (dict(boundaries=(3,), keep=(1.5,)), "out of range"),
        (dict(boundaries=(3,), keep=(-0.2,)), "out of range"),
        (dict(boundaries=(6, 3), keep=(0.5, 0.5)), "strictly increasing"),
        (dict(boundaries=(3, 3), keep=(0.5, 0.5)), "strictly increasing"),
        (dict(boundaries=(3,), keep=(0.5, 0.5)), "1 boundaries but 2 keep"),
        (dict(boundaries=(0.3, 9), keep=(0.5, 0.5)), "mix"),
        (dict(boundaries=(1.5,), keep=(0.5,)), "depth fraction in \\(0, 1\\)"),
        (dict(boundaries=(3,), keep=(0.5,), revive_top=0.0), "revive must be a fraction"),
        (dict(boundaries=(3,), keep=(0.5,), revive_top=1.5), "revive must be a fraction"),
        (dict(boundaries=(3,), keep=(0.5,), revive_margin=-0.1), "margin must be a number"),
        (dict(boundaries=(3,), keep=(0.5,), revive_margin=float("nan")), "margin must be a number"),
        (dict(boundaries=(3,), keep=(0.5,), revive_cap=-1), "cap must be a whole number"),
        (dict(boundaries=(3,), keep=(0.5,), reselect_every=0), "every must be a whole number"),
    ],
)
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LazyConfig(**kwargs)


@pytest.mark.parametrize(
    "text, message",
    [("3-0.5", "expected boundary:keep"), ("3:x", "Bad number"), ("3:0.5;fast", "Unknown")],
)
def test_bad_schedule_strings(text, message):
    with pytest.raises(ValueError, match=message):
        LazyConfig.parse(text)


def test_resolution_checks_the_model_depth():
    with pytest.raises(ValueError, match="outside 1..9"):
        LazyConfig(boundaries=(10,), keep=(0.5,)).resolve(10)
    with pytest.raises(ValueError, match="outside 1..9"):
        LazyConfig(boundaries=(0,), keep=(0.5,)).resolve(10)
    with pytest.raises(ValueError, match="outside 1..2"):
        LazyConfig.preset("paper").resolve(3)
    with pytest.raises(ValueError, match="too few layers"):
        LazyConfig(boundaries=(0.3, 0.35), keep=(0.5, 0.5)).resolve(5)
    # keep 1.0 boundaries prune nothing: they are dropped, which is exact.
    assert LazyConfig(boundaries=(3, 6), keep=(1.0, 0.5)).resolve(10).boundaries == (6,)


def test_prefill_fraction_arithmetic():
    schedule = LazyConfig.preset("paper").resolve(30)
    assert schedule.present_counts(1000) == [1000, 700, 490, 343]
    expected = (1000 * 9 + 700 * 9 + 490 * 9 + 343 * 3) / (1000 * 30)
    assert schedule.prefill_fraction(1000) == pytest.approx(expected)


def test_a_model_runs_its_stored_schedule_else_default():
    gemma, llama = tiny_model("gemma3_text"), tiny_model("llama")
    assert default_schedule(gemma) == LazyConfig.preset("default")
    assert default_schedule(llama) == resolve_schedule(llama, None) == LazyConfig.preset("default")
    object.__setattr__(gemma, "lazyllm_schedule", {"boundaries": [2], "keep": [0.5]})
    assert resolve_schedule(gemma, None) == LazyConfig(boundaries=(2,), keep=(0.5,))
    assert resolve_schedule(gemma, "default") == LazyConfig.preset("default")


def test_a_model_with_a_calibration_runs_it_for_that_preset(monkeypatch):
    import lazyllm_mlx.calibration as calibration_module
    from lazyllm_mlx import make_lazy_cache
    from lazyllm_mlx.families import architecture_of
    from lazyllm_mlx.generate import for_model

    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    table = {architecture_of(llama): {"default": "3:0.4;w=4;pool=3", "safe": "2:0.3;w=4"}}
    monkeypatch.setattr(calibration_module, "CALIBRATED", table)
    calibrated = for_model("default", llama)
    assert calibrated == LazyConfig.parse("3:0.4;w=4;pool=3") and calibrated.name == "default"
    assert for_model("default;norevive", llama) == LazyConfig.parse("3:0.4;w=4;pool=3;norevive")
    assert for_model("default;w=8", llama).window == 8  # options after the preset still apply
    assert for_model("safe", llama) == LazyConfig.parse("2:0.3;w=4")
    assert for_model("paper", llama) == LazyConfig.preset("paper")  # no calibration of it
    assert for_model("fast", llama) == calibrated  # none prunes harder than its default
    assert for_model("default", qwen) == LazyConfig.preset("default")  # another architecture
    assert for_model("0.5:0.6,0.75:0.6", llama) == LazyConfig.parse("0.5:0.6,0.75:0.6")
    # resolved once: a copy with other options is not resolved again
    randomized = replace(calibrated, selection="random")
    assert for_model(randomized, llama) == randomized
    assert default_schedule(llama) == calibrated == resolve_schedule(llama, "default")
    assert make_lazy_cache(llama, "default").schedule == calibrated.resolve(10)
    # a stored schedule is explicit
    assert LazyConfig.from_dict(calibrated.to_dict()) == calibrated


@pytest.mark.parametrize(
    "text, message",
    [
        ("10:inf", "out of range"),
        ("10:1e30", "out of range"),
        ("10:nan", "out of range"),
        ("\uff11\uff10:0.5", "Bad number"),  # full-width digits
        ("10:0.5;w=\uff16\uff14", "expected a whole number"),
    ],
)
def test_schedule_strings_out_of_range_or_not_ascii(text, message):
    with pytest.raises(ValueError, match=message):
        LazyConfig.parse(text)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"pool": 3.0}, "pool must be a whole number"),
        ({"window": 2.5}, "window must be a whole number"),
        ({"min_prompt_tokens": 0, "revive_cap": 0.5}, "revive_cap must be a whole number"),
        ({"sink": True}, "sink must be a whole number"),
        ({"boundaries": [2], "keep": ["0.5"]}, "keep must be a list of numbers"),
        ({"boundaries": "2", "keep": [0.5]}, "boundaries must be a list of numbers"),
        ({"revive": 1}, "revive must be true or false"),
        ({"revive_margin": "big"}, "revive_margin must be a number"),
    ],
)
def test_a_schedule_object_is_checked_field_by_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LazyConfig.from_dict(fields)


def test_the_window_rule_has_one_definition_in_two_forms():
    from lazyllm_mlx.config import WINDOW_RULE, WINDOW_RULE_TEXT

    parsed = LazyConfig.parse(f"none;{WINDOW_RULE_TEXT}")
    assert {key: getattr(parsed, key) for key in WINDOW_RULE} == WINDOW_RULE
    for name in ("default", "fast", "safe"):  # the generic presets rank with it
        preset = LazyConfig.preset(name)
        assert {key: getattr(preset, key) for key in WINDOW_RULE} == WINDOW_RULE
