"""The retrieval probe: its ranking is the engine's first boundary, its recall counts right."""

import json

import lazyllm_mlx  # noqa: F401
from lazyllm_mlx import LazyConfig, make_lazy_cache
from lazyllm_mlx.cli import main
from lazyllm_mlx.engine import LazyStats, prefill
from lazyllm_mlx.evals.probe import (
    answer_positions,
    layer_scores,
    probe,
    recall_at,
    suggest,
)
from lazyllm_mlx.evals.tasks import build_tasks
from lazyllm_mlx.families import family_of
from lazyllm_mlx.runner import runner_for

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import random_prompt, tiny_model


@pytest.mark.parametrize(
    "family, schedule",
    [
        ("llama", "4:0.3;w=8;pool=5;heads=max;sink=2"),
        ("llama", "6:0.5"),
        ("qwen2", "3:0.4;w=6;pool=3"),
        ("llama_sliding", "4:0.3;w=8;pool=3"),  # scores at the stage's last global layer
    ],
)
def test_the_probe_keeps_what_the_engines_first_boundary_keeps(family, schedule):
    model = tiny_model(family)
    config = LazyConfig.parse(schedule)
    cache = make_lazy_cache(model, config)
    tokens = random_prompt(48)
    fam = family_of(model)
    prefill(runner_for(model, cache.config), cache, tokens, LazyStats(fam.num_layers), step_size=16)
    kept_by_engine = set(np.array(cache.stages[1].positions[: cache.stages[1].size]).tolist())

    boundary, keep = cache.schedule.boundaries[0], cache.schedule.keep[0]
    scorer = max(i for i in range(boundary) if fam.windows[i] is None)
    (by_layer,) = layer_scores(model, tokens.tolist(), [config], step_size=16)
    scores = by_layer[scorer]
    s = np.array(scores, dtype=np.float64)
    recent = max(1, config.window, config.recent)
    s[-recent:] = np.inf
    s[: config.sink] = np.inf
    order = np.argsort(-s, kind="stable")[: len(kept_by_engine)]
    assert set(order.tolist()) == kept_by_engine
    # and recall_at agrees: every kept token counts as kept, a pruned one does not
    pruned = sorted(set(range(48)) - kept_by_engine)
    assert recall_at(scores, [sorted(kept_by_engine)], keep, config) == 1.0
    assert recall_at(scores, [pruned[:3]], keep, config) == 0.0


def test_recall_counts_the_best_occurrence():
    rule = LazyConfig.parse("none;w=2")
    scores = mx.array([0.9, 0.1, 0.8, 0.05, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0])
    # keep 0.4 of 10: the 2 forced last tokens and the 2 best others (positions 0 and 2)
    assert recall_at(scores, [[0, 2]], 0.4, rule) == 1.0
    assert recall_at(scores, [[1, 3], [2, 4]], 0.4, rule) == 0.5
    assert recall_at(scores, [[4]], 0.4, rule) == 0.0
    assert recall_at(scores, [[4]], 0.5, rule) == 1.0


def test_answer_positions_cover_each_occurrence_of_the_answer(smollm2):
    model, tokenizer, _ = smollm2
    (task,) = build_tasks(tokenizer, ["passkey"], 256, 1, 0, True)
    occurrences = answer_positions(tokenizer, task)
    assert len(occurrences) == 2  # "The pass key is K. Remember it. K is the pass key."
    for positions in occurrences:
        assert task.answer in tokenizer.decode([task.tokens[p] for p in positions])


def test_probe_reports_every_full_attention_layer_and_suggests_a_cut(smollm2):
    model, tokenizer, _ = smollm2
    rule, paper = LazyConfig.parse("none;w=16;pool=5"), LazyConfig.parse("none")
    report = probe(model, tokenizer, [rule, paper], length=256, num=1, keeps=[0.5, 1.0])
    assert report["rules"] == ["w=16;pool=5", ""]
    assert {(r["rule"], r["layer"]) for r in report["rows"]} == {
        (text, layer) for text in report["rules"] for layer in range(30)
    }
    full = [r for r in report["rows"] if r["keep"] == 1.0]
    assert all(r["mean"] == 1.0 for r in full)  # keeping everything keeps the answer
    best = suggest(report, target=1.0)
    assert best is not None and best["prefill_fraction"] <= 1.0
    assert best["schedule"] == f"{best['boundary']}:{best['keep']:g};w=16;pool=5"
    assert ";" not in suggest(report, target=1.0, rule="")["schedule"]  # the paper's rule


def test_probe_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = main(["probe", "--lengths", "256", "--num", "1", "--keeps", "0.5", "--quiet",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "256-token prompts" in text and "keep 0.5" in text
    report = json.loads(out.read_text())
    assert report["command"].startswith("lazyllm-mlx probe --lengths 256 --num 1")
    assert "--keeps 0.5" in report["command"]


@pytest.mark.parametrize("flag", [["--keeps", "0"], ["--keeps", "abc"], ["--lengths", "x"]])
def test_probe_rejects_bad_numbers_with_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", *flag])
    assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err
