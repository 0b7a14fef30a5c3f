"""`lazyllm-mlx eval`: task builders, scorers, the static-budget solver, a smoke run of the CLI."""

import json
import math

import lazyllm_mlx.cli.eval as eval_command
from lazyllm_mlx import LazyConfig
from lazyllm_mlx.cli import main
from lazyllm_mlx.config import split_schedules
from lazyllm_mlx.evals.run import Method, best_schedule, build_methods, static_config, summarize
from lazyllm_mlx.evals.scores import (
    contains_word,
    edit_similarity,
    first_code_line,
    kl_divergence,
    number_match,
    paired_accuracy_delta,
    prefix_fraction,
    score_answer,
)
from lazyllm_mlx.evals.sources import read_source, stdlib_path
from lazyllm_mlx.evals.tasks import TASKS, build_tasks, place

import numpy as np
import pytest
from tiny_models import tiny_model

LENGTH = 300


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module", params=[True, False], ids=["chat", "plain"])
def suites(request, tokenizer):
    """Two instances of every task, built twice with one seed and once with another."""
    chat = request.param
    build = lambda seed: build_tasks(tokenizer, TASKS, LENGTH, 2, seed, chat)  # noqa: E731
    return chat, build(7), build(7), build(8)


def test_builders_are_deterministic_and_exactly_the_requested_length(suites):
    _, first, again, other = suites
    assert [t.task for t in first] == [n for n in TASKS for _ in range(2)]
    assert [t.tokens for t in first] == [t.tokens for t in again]
    assert [t.answer for t in first] == [t.answer for t in again]
    assert all(len(t.tokens) == LENGTH for t in first + other)
    assert all(a.tokens != b.tokens for a, b in zip(first, other))


def test_instances_do_not_depend_on_how_many_are_built(tokenizer):
    one = build_tasks(tokenizer, ["passkey", "code"], LENGTH, 1, 7, True)
    two = build_tasks(tokenizer, ["passkey", "code"], LENGTH, 2, 7, True)
    assert [t.tokens for t in one] == [t.tokens for t in two if t.index == 0]


def test_a_later_first_prompt_extends_an_earlier_run(tokenizer):
    four = build_tasks(tokenizer, ["passkey", "code"], LENGTH, 4, 7, True)
    later = build_tasks(tokenizer, ["passkey", "code"], LENGTH, 2, 7, True, first=2)
    assert [(t.task, t.index) for t in later] == [
        ("passkey", 2),
        ("passkey", 3),
        ("code", 2),
        ("code", 3),
    ]
    assert [t.tokens for t in later] == [t.tokens for t in four if t.index >= 2]


def test_code_tasks_reach_long_prompts(tokenizer):
    # Few standard library files are long enough for 4K tokens: the builder looks beyond its stride.
    tasks = build_tasks(tokenizer, ["code"], 4096, 3, 3, True)
    assert all(len(t.tokens) == 4096 for t in tasks)
    assert len({(t.meta["file"], t.meta["line"]) for t in tasks}) == 3


def test_the_fact_sits_in_its_span_at_the_intended_depth(suites, tokenizer):
    chat, tasks, _, _ = suites
    for task in (t for t in tasks if t.task in ("passkey", "kv", "mdqa")):
        begin, end = task.meta["answer_span"]
        inserted = tokenizer.decode(task.tokens[begin:end])
        assert task.answer in inserted
        outside = tokenizer.decode(task.tokens[:begin]) + tokenizer.decode(task.tokens[end:])
        if task.task == "passkey":
            assert inserted.startswith(f"The pass key is {task.answer}. Remember it.")
            assert task.answer not in outside
        if task.task == "kv":
            assert f"{task.meta['key']}: {task.answer}\n" in inserted
        if task.task == "mdqa":  # one document of that function, the only one of its module
            assert inserted.startswith(
                f"Function: {task.meta['function']}\nModule: {task.answer}\n"
            )
            assert f"Module: {task.answer}\n" not in outside
            assert outside.count(f"Function: {task.meta['function']}\n") == 1  # in the cue
    by_depth = {t.meta["depth"]: t.meta["answer_span"][0] for t in tasks if t.task == "passkey"}
    assert by_depth[0.1] < by_depth[0.3]
    if chat:
        assert tokenizer.decode(tasks[0].tokens).startswith("<|im_start|>")
    else:
        assert tokenizer.decode(tasks[0].tokens).startswith("There is a pass key")
        assert tokenizer.decode(tasks[0].tokens).endswith("Answer: The pass key is")


def test_code_prompt_ends_right_before_the_true_line(suites, tokenizer):
    _, tasks, _, _ = suites
    for task in (t for t in tasks if t.task == "code"):
        lines = read_source(stdlib_path() / task.meta["file"]).splitlines(keepends=True)
        target = lines[task.meta["line"] - 1]
        assert target.strip() == task.answer
        indent = target[: len(target) - len(target.lstrip())]
        before = "".join(lines[: task.meta["line"] - 1])
        end = tokenizer.decode(task.tokens[-40:])  # the prompt may end inside the indent
        assert any((before + indent[:i]).endswith(end) for i in range(len(indent) + 1))
        assert task.answer not in end


def test_place_cuts_filler_to_the_budget_and_keeps_the_insert_whole():
    units = [[i] * 10 for i in range(1, 20)]
    tokens, start = place(iter(units), [0, 0, 0], budget=55, depth=0.5)
    assert len(tokens) == 55
    assert start == 30 and tokens[start : start + 3] == [0, 0, 0]
    tokens, start = place(iter(units), [0] * 5, budget=55, depth=1.0)
    assert tokens[start : start + 5] == [0] * 5 and len(tokens) == 55
    with pytest.raises(ValueError, match="Not enough filler"):
        place(iter(units[:2]), [0], budget=55, depth=0.5)


def test_answer_scorers():
    assert number_match("The pass key is 82255.", "82255") == 1.0
    assert number_match("The pass key is 8225.", "82255") == 0.0
    assert number_match("82255 or 1", "82255") == 1.0 and number_match("no idea", "1") == 0.0
    assert contains_word("The function is `inspect.getmro()`.", "getmro") == 1.0
    assert contains_word("getmro_all", "getmro") == 0.0
    assert first_code_line("```python\n\n    x = f(1)\ny = 2") == "x = f(1)"
    assert edit_similarity("abcd", "abce") == 0.75 and edit_similarity("", "") == 1.0
    assert score_answer("edit", "```\n  return x\n", "return x") == 1.0
    with pytest.raises(ValueError):
        score_answer("fuzzy", "a", "a")


def test_agreement_scorers():
    p = np.array([math.log(0.5), math.log(0.5), -math.inf])
    q = np.array([math.log(0.9), math.log(0.1), -math.inf])
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5))
    assert kl_divergence(q, np.array([0.0, -math.inf, -math.inf])) == math.inf
    assert prefix_fraction([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert prefix_fraction([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    assert prefix_fraction([], []) == 1.0 and prefix_fraction([5], [6]) == 0.0


def test_paired_accuracy_delta_and_its_standard_error():
    def records(*scores):
        return [dict(task=t, score=s) for t, s in zip(["kv", "kv", "code", "code"], scores)]

    base = records(1.0, 0.0, 0.5, 0.5)
    assert paired_accuracy_delta(base, base) == (0.0, 0.0)
    delta, se = paired_accuracy_delta(records(0.0, 0.0, 0.5, 0.7), base)
    # kv: differences -100, 0 (mean -50, se 50); code: 0, +20 (mean 10, se 10); over two tasks
    assert delta == pytest.approx((-50 + 10) / 2)
    assert se == pytest.approx(math.sqrt(50**2 + 10**2) / 2)
    with pytest.raises(ValueError):
        paired_accuracy_delta(base[:3], base)


def test_a_method_row_counts_first_tokens_where_the_baseline_is_right_apart():
    def record(score, first):
        return dict(task="kv", score=score, first_token=first, kl=0.0, continuation=1.0,
                    prefill_fraction=0.5, ttft=1.0)  # fmt: skip

    base = [record(1.0, 1.0), record(1.0, 1.0), record(0.0, 1.0), record(0.0, 1.0)]
    lazy = [record(1.0, 1.0), record(1.0, 1.0), record(1.0, 0.0), record(0.0, 0.0)]
    row = summarize(Method("lazy", "lazy", LazyConfig.preset("default")), lazy, base, None)
    assert row["first_token"] == 0.5
    assert row["first_token_where_right"] == 1.0  # it differs only where the baseline is wrong
    assert row["accuracy_delta"] == pytest.approx(25.0)
    unsolved = [record(0.0, 1.0)] * 4
    assert (
        summarize(Method("l", "lazy", None), lazy, unsolved, None)["first_token_where_right"]
        is None
    )


@pytest.mark.parametrize("layers", [10, 18, 30])
@pytest.mark.parametrize("schedule", ["paper", "default", "0.5:0.8,0.75:0.7", "2:0.5,5:0.6"])
def test_static_reference_matches_the_lazy_prefill_within_one_token(layers, schedule):
    config = LazyConfig.parse(schedule)
    lazy = config.resolve(layers)
    for n in (100, 1000, 1024, 2048, 4095):
        static = static_config(config, layers, n)
        assert not static.revive and len(static.boundaries) == 1
        resolved = static.resolve(layers)
        b = resolved.boundaries[0]
        assert b == lazy.boundaries[0]
        one_token = (layers - b) / (layers * n)
        assert abs(resolved.prefill_fraction(n) - lazy.prefill_fraction(n)) <= one_token


def test_methods_compare_at_equal_budgets():
    methods = build_methods(["paper", "paper;norevive", "none", "paper"], 30, 1024)
    labels = [m.label for m in methods]
    assert labels == [
        "baseline",
        "none",
        "paper",
        "paper;norevive",
        "random[paper]",
        "static[paper]",
        "random[paper;norevive]",
    ]  # "none" as a schedule is the engine column; static[paper;norevive] is static[paper]
    by_label = {m.label: m for m in methods}
    assert by_label["baseline"].lazy is None
    assert by_label["random[paper]"].lazy.selection == "random"
    assert by_label["random[paper;norevive]"].lazy.revive is False
    assert by_label["static[paper]"].matched_to == "paper"
    assert [m.label for m in build_methods(["paper"], 30, 1024, False, False)] == [
        "baseline",
        "paper",
    ]


def test_split_schedules():
    got = split_schedules(["paper,default", "0.5:0.8,0.75:0.7", "paper;norevive", "paper"])
    assert got == ["paper", "default", "0.5:0.8,0.75:0.7", "paper;norevive"]
    with pytest.raises(ValueError, match="mixes presets"):
        split_schedules(["paper,0.5:0.8"])


def test_best_schedule_is_the_fastest_within_the_target():
    def row(method, family, accuracy, speedup):
        return dict(
            method=method,
            family=family,
            schedule=method,
            accuracy=accuracy,
            ttft_speedup=speedup,
            accuracy_delta_se=0.5,
        )

    rows = [
        row("baseline", "baseline", 80.0, 1.0),
        row("a", "lazy", 79.5, 1.5),
        row("b", "lazy", 75.0, 2.5),
        row("c", "lazy", 80.0, 1.2),
        row("random[b]", "random", 80.0, 3.0),
    ]
    assert best_schedule({"results": rows}, 1.0)["schedule"] == "a"
    assert best_schedule({"results": rows + [dict(rows[1], length=2)]}, 1.0)["se"] == (
        pytest.approx(0.5 / math.sqrt(2))
    )
    assert best_schedule({"results": rows}, 10.0)["schedule"] == "b"
    assert best_schedule({"results": rows[:1] + rows[2:3]}, 1.0) is None


def test_eval_command_smoke(tmp_path, capsys, monkeypatch, tokenizer):
    """The whole command on a tiny random llama with the real tokenizer (fast, same code path)."""
    model = tiny_model("llama", vocab_size=len(tokenizer.vocab))
    monkeypatch.setattr(eval_command, "load", lambda path: (model, tokenizer))
    out = tmp_path / "eval.json"
    argv = ["eval", "--lengths", "320", "--num", "1", "--max-tokens", "2", "--quiet"]
    argv += ["--schedules", "paper", "--json", str(out)]
    plot = None
    try:
        import matplotlib  # noqa: F401

        plot = tmp_path / "eval.png"
        argv += ["--plot", str(plot)]
    except ImportError:
        pass
    assert main(argv) == 0
    report = json.loads(out.read_text())
    methods = ["baseline", "none", "paper", "random[paper]", "static[paper]"]
    assert [r["method"] for r in report["results"]] == methods
    for r in report["results"]:
        assert set(r["scores"]) == set(TASKS)
        assert len(r["instances"]) == len(TASKS)
        assert 0.0 <= r["accuracy"] <= 100.0 and r["ttft_speedup"] > 0
        baseline_accuracy = report["results"][0]["accuracy"]
        assert r["accuracy_delta"] == pytest.approx(r["accuracy"] - baseline_accuracy)
        assert r["accuracy_delta_se"] >= 0
    baseline, none, paper = report["results"][:3]
    assert none["scores"] == baseline["scores"] and none["kl"] == pytest.approx(0, abs=1e-4)
    assert paper["prefill_fraction"] < 0.8
    printed = capsys.readouterr().out
    assert "random[paper]" in printed
    assert "±" not in printed.split("-token prompts")[1]  # one prompt: no error estimate ...
    assert "no error estimate" in printed and "(no se)" in printed  # ... and it says so
    if plot is not None:
        assert plot.stat().st_size > 0


def test_a_long_run_reports_what_it_has_done_after_every_prompt(tokenizer):
    """on_prompt sees the report over the prompts done so far (for a JSON kept during the run)."""
    from lazyllm_mlx.evals.run import evaluate

    model = tiny_model("llama", vocab_size=len(tokenizer.vocab))
    seen = []
    report = evaluate(
        model, tokenizer, schedules=["paper"], lengths=[320], tasks=["passkey", "kv"], num=1,
        max_tokens=2, references=False, include_none=False, log=None,
        on_prompt=lambda partial: seen.append(partial),
    )  # fmt: skip
    assert len(seen) == 1  # after the first of two prompts; the last one is the report itself
    assert [len(r["instances"]) for r in seen[0]["results"]] == [1, 1]
    assert [len(r["instances"]) for r in report["results"]] == [2, 2]
