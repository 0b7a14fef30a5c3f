"""`calibrate`: the layout it chooses from a probe, its back-off, and the whole command on a tiny
model with a real tokenizer."""

from __future__ import annotations

import json

import lazyllm_mlx
from lazyllm_mlx import CalibrateOptions, LazyConfig
from lazyllm_mlx import calibrate as calibrate_module_function
from lazyllm_mlx.calibrate import (
    KEEPS,
    back_off_ladder,
    cheapest_layout,
    expected_fraction,
)
from lazyllm_mlx.calibration_store import find, read, store_dir
from lazyllm_mlx.cli import main
from lazyllm_mlx.generate import default_schedule, for_model

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

RULE = ";margin=0.5;min=256;w=64;pool=13;heads=max;sink=4"
calibrate_module = __import__("lazyllm_mlx.calibrate", fromlist=["verify"])


def table(good: dict[int, float], layers: int = 30) -> dict[tuple[int, float], float]:
    """A probe's recall: 1.0 at layer i for keeps >= good[i], 0.0 elsewhere."""
    return {(i, k): float(i in good and k >= good[i]) for i in range(layers) for k in KEEPS}


def test_the_cheapest_layout_cuts_after_the_retrieving_layers():
    # answers found at layer 7 keeping 25 %, at layer 17 keeping 10 %: cut at 8 and 18
    recall = table({7: 0.25, 17: 0.1})
    options = CalibrateOptions(length=2048)
    assert cheapest_layout(recall, 30, options) == [(8, 0.25), (18, 0.1)]
    assert back_off_ladder(recall, 30, options) == [
        # layer 7 ranks sharply: 0.25 x 2048 tokens, a budget, then 0.1 / 0.25 of those: 39.0 %
        "8:512,18:0.4" + RULE,
        "8:512" + RULE,  # one cut fewer: 45.0 %
        "8:768,18:0.4" + RULE,  # every cut keeping 1.5 times more: 45.2 %
        "8:1024,18:0.4" + RULE,  # twice as many: 51.3 %
        "8:768" + RULE,  # 54.2 %
        "8:1024" + RULE,  # 63.3 %
        "8:0.6" + RULE,  # a share at every length: 70.7 %
    ]
    # a layer that needs 30 % to keep the answer keeps a share of every prompt, not a budget
    assert [c.split(";")[0] for c in back_off_ladder(table({7: 0.3, 17: 0.1}), 30, options)] == [
        "8:0.3,18:0.34", "8:0.45,18:0.34", "8:0.3", "8:0.6,18:0.34", "8:0.45", "8:0.6",
    ]  # fmt: skip
    # nothing that computes everything is worth verifying (here 15:1 alone)
    wide = back_off_ladder(table({14: 0.5, 18: 0.25}), 30, options)
    assert [w.split(";")[0] for w in wide] == [
        "15:0.5,19:0.5", "15:0.75,19:0.5", "15:0.5", "15:1,19:0.5", "15:0.75",
    ]  # fmt: skip
    # a layer that needs more than half the prompt to keep the answer is not ranking it
    assert cheapest_layout(table({1: 0.6, 14: 0.5}), 30, options) == [(15, 0.5)]
    # a layer that finds nothing at any keep leaves nothing to verify
    assert back_off_ladder(table({}), 30, options) == []
    # the last layer ranks for no boundary
    assert cheapest_layout(table({29: 0.05}), 30, options) is None


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 11), st.sampled_from(KEEPS), max_size=6),
       st.integers(1, 3))  # fmt: skip
def test_every_cut_chosen_keeps_the_answer_and_none_cheaper_exists(good, max_cuts):
    layers = 12
    recall = table(good, layers)
    options = CalibrateOptions(max_cuts=max_cuts)
    layout = cheapest_layout(recall, layers, options)
    singles = [(b, k) for (i, k), r in recall.items() if r >= 0.95 and (b := i + 1) < layers]
    if not singles:
        assert layout is None
        return
    assert 1 <= len(layout) <= max_cuts
    assert all(k2 < k1 for (_, k1), (_, k2) in zip(layout, layout[1:]))  # each keeps less
    for b, k in layout:
        assert recall[b - 1, k] >= 0.95  # the layer before each boundary keeps the answer there
    assert [b for b, _ in layout] == sorted({b for b, _ in layout})

    def cost(cuts):
        edges = [b for b, _ in cuts] + [layers]
        return (cuts[0][0] + sum(k * (e - b) for (b, k), e in zip(cuts, edges[1:]))) / layers

    assert cost(layout) <= min(cost([s]) for s in singles) + 1e-9


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    """Each test starts with an empty calibration store of its own."""
    monkeypatch.setenv("LAZYLLM_MLX_CALIBRATIONS", str(tmp_path / "store"))


@pytest.fixture
def tiny_with_tokenizer(smollm2):
    """A random 10-layer llama over SmolLM2's vocabulary: real prompts, seconds per run."""
    _, tokenizer, _ = smollm2
    return tiny_model("llama", vocab_size=len(tokenizer.vocab)), tokenizer


def test_calibrate_chooses_verifies_stores_and_every_preset_then_uses_it(
    tiny_with_tokenizer, monkeypatch
):
    model, tokenizer = tiny_with_tokenizer
    assert for_model("default", model).source.startswith("generic layout")
    said, ticks = [], []
    options = CalibrateOptions(
        length=300, probe_prompts=1, verify_prompts=1, target=0.0, decode_rounds=1
    )
    calibration = calibrate_module_function(
        model, tokenizer, options, label="tiny", progress=ticks.append, say=said.append
    )
    # target 0: every cut keeps "enough", so the cheapest layout is the earliest, thinnest one
    default = calibration.schedules["default"]
    assert default.startswith("1:128;")  # 5 % of 300 tokens, up to a multiple of 128
    # 3 probe passes, baseline and lazy on 4 prompts, 3 timed decodes, and when every= was
    # faster, its verification on the 4 prompts (the baseline's from the cache, also ticked)
    decoding = calibration.evidence["decoding"]
    assert len(ticks) == 3 + 2 * 4 + 3 + (2 * 4 if "verified" in decoding else 0)
    assert decoding["chosen"] == default
    assert set(decoding["vs_baseline"]) == {"every step", "every=4"}
    assert any(line.startswith("decoding, 16 tokens") for line in said)
    assert any(line.startswith("verify 1:128") and "holds" in line for line in said)
    assert calibration.evidence["rungs"][0]["verdict"] is None
    fractions = calibration.evidence["expected_prefill_fraction"]["default"]
    assert fractions[2048] > fractions[8192] > fractions[32768]  # a budget: the share falls
    # stored, and from now on this model's presets resolve to it, saying so
    path = store_dir() / f"{calibration.fingerprint}.json"
    assert read(path).schedules == calibration.schedules
    resolved = for_model("default", model)
    assert resolved == LazyConfig.parse(default) and "calibrated for this model" in resolved.source
    assert default_schedule(model) == resolved
    assert for_model("fast", model) == resolved  # nothing measured prunes harder
    assert for_model("default;norevive", model) == LazyConfig.parse(default + ";norevive")
    # a fresh load of the same weights (another object) finds it in the store
    twin = tiny_model("llama", vocab_size=len(tokenizer.vocab))
    assert find(twin).schedules == calibration.schedules
    assert find(tiny_model("llama", seed=3, vocab_size=len(tokenizer.vocab))) is None
    # a rerun (say after an interruption) reuses the probe and the baselines
    monkeypatch.setattr(calibrate_module, "probe", lambda *a, **k: pytest.fail("probed again"))
    ticks.clear()
    options.decode_rounds = 0  # not timed: the schedule that held, selecting at every step
    again = calibrate_module_function(model, tokenizer, options, progress=ticks.append, save=False)
    assert again.schedules["default"] == calibration.evidence["rungs"][-1]["schedule"]
    assert len(ticks) == 3 + 2 * 4 and again.evidence["decoding"] is None


def test_a_failed_verification_backs_off_and_says_so(tiny_with_tokenizer, monkeypatch):
    model, tokenizer = tiny_with_tokenizer
    verdicts = iter([["code", 0.9, 0.2], []])

    def verify(model, tokenizer, text, options, baselines, tick):
        lost = next(verdicts)
        records = [dict(task="passkey", index=1, score=1.0, base_score=1.0, first_token=1.0)]
        if lost:
            records.append(dict(task=lost[0], index=4, score=lost[2], base_score=lost[1],
                                first_token=1.0))  # fmt: skip
        return dict(instances=records, accuracy_delta=-1.0, accuracy_delta_se=1.0,
                    first_token=1.0, first_token_where_right=1.0, kl=0.1, continuation=1.0,
                    prefill_fraction=0.5, ttft_speedup=1.5, scores={})  # fmt: skip

    monkeypatch.setattr(calibrate_module, "verify", verify)
    said = []
    options = CalibrateOptions(length=300, probe_prompts=1, target=0.0, decode_rounds=0)
    calibration = calibrate_module_function(model, tokenizer, options, say=said.append, save=False)
    first, second = [r["schedule"] for r in calibration.evidence["rungs"]]
    assert "got worse (code#4)" in calibration.evidence["rungs"][0]["verdict"]
    assert calibration.schedules["default"] == second != first
    assert any("backing off" in line for line in said)
    assert find(model) is None  # save=False stores nothing


def test_a_model_whose_attention_finds_nothing_is_refused(tiny_with_tokenizer, monkeypatch):
    model, tokenizer = tiny_with_tokenizer

    def probe(*args, keeps, **kwargs):
        return dict(rows=[dict(layer=i, keep=k, mean=0.0) for i in range(10) for k in keeps])

    monkeypatch.setattr(calibrate_module, "probe", probe)
    with pytest.raises(ValueError, match="not one to prune"):
        calibrate_module_function(model, tokenizer, CalibrateOptions(length=300))


def test_expected_fraction_falls_with_length_under_a_budget():
    text = "8:1536,15:0.4,19:0.5" + RULE
    f = [expected_fraction(text, 30, n) for n in (2048, 8192, 32768)]
    assert f[0] > f[1] > f[2]
    assert expected_fraction(text, 30, 200) == 1.0  # below min=256: not pruned


def test_the_command_refuses_an_unprunable_model_before_any_work(tmp_path, capsys, monkeypatch):
    from mlx_lm.utils import save_config, save_model
    from tiny_models import tiny_gpt2, tiny_tokenizer

    config, model = tiny_gpt2()
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(calibrate_module, "probe", lambda *a, **k: pytest.fail("probed"))
    assert main(["calibrate", "--model", str(tmp_path), "--quiet"]) == 2
    assert "cannot prune model type 'gpt2'" in capsys.readouterr().err
    assert main(["calibrate", "--length", "100"]) == 2
    assert "at least 256 tokens" in capsys.readouterr().err
    assert main(["calibrate", "--length", "9000"]) == 2  # SmolLM2 reads 8,192
    assert "longer than the model's context (8192)" in capsys.readouterr().err


def test_the_command_prints_the_choice_and_the_fractions_it_expects(
    tiny_with_tokenizer, monkeypatch, capsys, tmp_path
):
    model, tokenizer = tiny_with_tokenizer
    monkeypatch.setattr("lazyllm_mlx.cli.calibrate.load", lambda path: (model, tokenizer))
    out = tmp_path / "calibration.json"
    argv = ["calibrate", "--length", "300", "--probe-prompts", "1", "--verify-prompts", "1",
            "--target", "0", "--quiet", "--json", str(out), "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "default: 1:128;" in text and "prefill fraction" in text and "at 32K" in text
    assert "dry run: nothing stored" in text and find(model) is None
    assert "measured in " in text and " min" in text
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("lazyllm-mlx calibrate --length 300")
    assert lazyllm_mlx.calibrate is calibrate_module_function  # the API's name is the function


def test_an_interrupted_calibration_stores_nothing(tiny_with_tokenizer, monkeypatch):
    model, tokenizer = tiny_with_tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_module, "verify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_module_function(model, tokenizer, CalibrateOptions(length=300, target=0.0))
    assert find(model) is None
    kept = [p.name for p in store_dir().rglob("*") if p.is_file()]
    assert all(not name.startswith(".") for name in kept)  # no temporary file left behind


def test_when_no_candidate_holds_nothing_is_stored(tiny_with_tokenizer, monkeypatch):
    model, tokenizer = tiny_with_tokenizer

    def verify(model, tokenizer, text, options, baselines, tick):
        records = [dict(task="passkey", index=4, score=0.0, base_score=1.0, first_token=0.0)]
        return dict(instances=records, accuracy_delta=-100.0, accuracy_delta_se=0.0,
                    first_token=0.0, first_token_where_right=0.0, kl=3.0, continuation=0.0,
                    prefill_fraction=0.5, ttft_speedup=1.5, scores={})  # fmt: skip

    monkeypatch.setattr(calibrate_module, "verify", verify)
    with pytest.raises(ValueError, match="nothing is stored and the generic layout stays"):
        calibrate_module_function(model, tokenizer, CalibrateOptions(length=300, target=0.0))
    assert find(model) is None


def test_every_is_chosen_only_when_it_decodes_faster_and_its_answers_hold(monkeypatch):
    text = "8:1536,15:0.4" + RULE
    decoding = __import__("lazyllm_mlx.calibrate_decoding", fromlist=["choose_every"])
    assert decoding.with_every(text, 4) == "8:1536,15:0.4;every=4" + RULE
    assert LazyConfig.parse(decoding.with_every(text, 4)).reselect_every == 4
    verified, said = [], []

    def choose(speeds, verdict=None):
        monkeypatch.setattr(decoding, "decode_speeds", lambda *a: dict(zip(
            ("baseline", "every step", "every=4"), speeds)))  # fmt: skip
        said.clear()

        def holds(candidate):
            verified.append(candidate)
            return dict(schedule=candidate, verdict=verdict)

        return decoding.choose_every(None, None, text, 2048, 3, holds, print, said.append)

    chosen, evidence = choose((10.0, 8.9, 10.4))  # 0.89x -> 1.04x: kept once verified
    assert chosen == decoding.with_every(text, 4) == verified.pop() == evidence["chosen"]
    assert evidence["vs_baseline"] == {"every step": 0.89, "every=4": 1.04}
    assert "0.89x selecting at every step, 1.04x with every=4: kept" in said[0]
    chosen, evidence = choose((10.0, 9.0, 9.3))  # within timing noise: not worth verifying
    assert chosen == text and not verified and "no clear gain" in said[0]
    chosen, evidence = choose((10.0, 8.0, 10.0), verdict="fails: the first token changed")
    assert chosen == text and verified and "it fails: the first token changed" in said[0]
    assert evidence["verified"]["verdict"].startswith("fails")


def test_a_negative_number_of_decode_rounds_is_refused(tiny_with_tokenizer, capsys):
    model, tokenizer = tiny_with_tokenizer
    with pytest.raises(ValueError, match="decode_rounds must be 0 or more"):
        calibrate_module_function(model, tokenizer, CalibrateOptions(decode_rounds=-1))
    with pytest.raises(SystemExit):
        main(["calibrate", "--decode-rounds", "-1"])
    assert "--decode-rounds: expected an integer >= 0, got '-1'" in capsys.readouterr().err
