"""The scripts in tools/: BENCHMARKS.md tables, pooling, comparisons and timings, on tiny inputs."""

import importlib.util
from pathlib import Path

from lazyllm_mlx import LazyConfig, instrument
from lazyllm_mlx.config import as_config

import mlx.core as mx
import pytest
from tiny_models import random_prompt, tiny_model

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_steps_counts_deferred_work_only_with_revival():
    profile = tool("profile_decode")
    model = tiny_model("llama")
    layers = len(model.layers)
    prompt = random_prompt(64)
    schedule = LazyConfig(boundaries=(0.5,), keep=(0.5,), min_prompt_tokens=0)
    norevive = as_config(schedule.to_string() + ";norevive")

    _, times, computed = profile.timed_steps(model, prompt, None, 6)
    assert len(times) == 5 and computed == [0] * 5  # the baseline keeps no lazy counters
    _, times, computed = profile.timed_steps(model, prompt, norevive, 6)
    assert len(times) == 5 and computed == [layers] * 5  # the new token, every layer, nothing else
    _, times, computed = profile.timed_steps(model, prompt, schedule, 6)
    assert len(times) == 5 and all(c >= layers for c in computed)
    assert sum(computed) > 5 * layers  # decoding revived pruned tokens
    costs = profile.layer_row_costs(model, rows=(1, 3), repeats=2)
    assert list(costs) == [1, 3] and all(c > 0 for c in costs.values())
    attention = profile.attention_row_costs(model, 40, rows=(1, 3), repeats=2)
    assert list(attention) == [1, 3] and all(a > 0 and s > 0 for a, s in attention.values())


def test_stage_breakdown_counts_the_tokens_each_stage_computes():
    profile = tool("profile_decode")
    model = tiny_model("llama")
    prompt = random_prompt(64)
    schedule = LazyConfig(boundaries=(0.5,), keep=(0.5,), min_prompt_tokens=0)
    rows = profile.stage_breakdown(model, prompt, schedule, 8)
    assert [(r["stage"], r["layers"]) for r in rows] == [(0, 5), (1, 5)]
    assert rows[0]["tokens"] == 1 and rows[0]["selection_ms"] == 0.0
    assert rows[1]["tokens"] >= 1 and rows[1]["selection_ms"] > 0
    assert all(r["stage_ms"] > 0 for r in rows)
    assert not isinstance(instrument.active(), profile.StageTimes)  # restored
    rows = profile.stage_breakdown(model, prompt, as_config("0.5:0.5;min=0;norevive"), 8)
    assert [r["tokens"] for r in rows] == [1, 1] and rows[1]["selection_ms"] == 0.0


def test_least_squares_slope_and_step_groups():
    profile = tool("profile_decode")
    assert profile.least_squares_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert profile.least_squares_slope([2, 2], [1, 5]) == 0.0
    groups = profile.by_deferred([5, 15, 15, 200], [0.1, 0.2, 0.4, 1.0])
    assert groups == [
        ("0-10", 1, 0.1, 5),
        ("11-20", 2, pytest.approx(0.3), 15),
        (">100", 1, 1.0, 200),
    ]


def test_benchmarks_md_tables():
    tables = tool("benchmarks_md")
    bench = {
        "command": "lazyllm-mlx bench", "model": "m", "device": "cpu", "runs": 3,
        "max_tokens": 16,
        "rows": [
            {"length": 1024, "method": "baseline", "ttft": 7.4, "generation_tps": 11.8,
             "peak_memory_gb": 0.667},
            {"length": 1024, "method": "paper", "ttft": 4.46, "generation_tps": 6.1,
             "peak_memory_gb": 0.641, "speedup": 1.656, "ideal_speedup": 1.446,
             "measured_over_ideal": 1.145, "prefill_fraction": 0.692, "decode_vs_baseline": 0.516,
             "total_speedup": 1.402, "short_decode_tps": 5.2, "short_decode_vs_baseline": 0.44,
             "short_total_speedup": 1.31},
        ],
    }  # fmt: skip
    lines = tables.bench_table(bench).splitlines()
    assert lines[-2].startswith("| 1024 | `baseline` | 7.40 |  |")
    assert lines[-1] == (
        "| 1024 | `paper` | 4.46 | 1.66 | 1.45 | 1.15 | 0.692 | 5.2 | 0.44 | 6.1 | 0.52 | 1.31 "
        "| 1.40 | 0.641 |"
    )
    report = {
        "command": "lazyllm-mlx eval", "num": 3, "seed": 0, "python": "3.11", "tasks": ["passkey"],
        "lengths": [1024],
        "results": [
            {"length": 1024, "method": "baseline", "prefill_fraction": 1.0,
             "scores": {"passkey": 100.0}, "accuracy": 100.0, "first_token": 1.0, "kl": 0.0,
             "continuation": 1.0, "ttft_speedup": 1.0,
             "instances": [{"task": "passkey", "score": 1.0, "first_token": 1.0}] * 2},
            {"length": 1024, "method": "paper", "prefill_fraction": 0.7,
             "scores": {"passkey": 50.0}, "accuracy": 50.0, "first_token": 0.5, "kl": 0.1,
             "continuation": 0.5, "ttft_speedup": 1.6,
             "instances": [{"task": "passkey", "score": 1.0, "first_token": 1.0},
                           {"task": "passkey", "score": 0.0, "first_token": 0.0}]},
        ],
    }  # fmt: skip
    lines = tables.eval_table(report).splitlines()
    assert lines[-2] == (
        "| `baseline` | 1.000 | 100.0 | 100.0 | +0.0 ± 0.0 | 100 % | 100 % | 0.000 | 100 % | 1.00 |"
    )
    assert lines[-1] == (
        "| `paper` | 0.700 | 50.0 | 50.0 | -50.0 ± 50.0 | 50 % | 50 % | 0.100 | 50 % | 1.60 |"
    )
    # A pooled report: a method run on one prompt of the baseline's two is paired by prompt.
    baseline, paper = report["results"]
    baseline["instances"] = [
        {"task": "passkey", "index": 0, "score": 0.0, "first_token": 1.0},
        {"task": "passkey", "index": 1, "score": 1.0, "first_token": 1.0},
    ]
    paper["instances"] = [{"task": "passkey", "index": 1, "score": 0.0, "first_token": 0.0}]
    assert "| -100.0 ± 0.0 | 50 % | 0 % |" in tables.eval_table(report).splitlines()[-1]


def test_pool_evals_summarizes_disjoint_reports_as_one_run():
    from lazyllm_mlx.evals.run import summarize_records

    pool = tool("pool_evals").pool
    scores = {"baseline": [1, 1, 0, 1, 0.5, 1], "lazy": [1, 0, 0, 1, 0.5, 0.25]}
    tasks = ["passkey", "passkey", "passkey", "code", "code", "code"]

    def instances(method, picks):
        lazy = method == "lazy"
        return [dict(task=tasks[i], index=i, score=scores[method][i], first_token=1.0, kl=0.1,
                     continuation=1.0, prefill_fraction=0.5 if lazy else 1.0,
                     ttft=1.0 if lazy else 2.0, output=str(i)) for i in picks]  # fmt: skip

    def report(picks, command):
        results = [
            dict(length=64, **summarize_records(
                dict(method=m, family=m, schedule=m, matched_to=None),
                instances(m, picks), instances("baseline", picks), None))
            for m in scores
        ]  # fmt: skip
        return dict(model="m", command=command, python="3.11", date="d", num_layers=2,
                    chat_template=False, lengths=[64], tasks=["passkey", "code"], seed=1,
                    results=results)  # fmt: skip

    whole = report(range(6), "all")
    pooled = pool([report([0, 3], "a"), report([1, 2, 4, 5], "b")])
    for got, want in zip(pooled["results"], whole["results"]):
        for key in ("scores", "accuracy", "accuracy_delta", "accuracy_delta_se", "ttft_speedup"):
            assert got[key] == pytest.approx(want[key]), key
    assert pooled["results"][1]["accuracy_delta"] < 0
    again = pool([report([0, 3], "a"), report([1, 2, 4, 5], "b"), report([3, 4], "c")])
    assert again["results"][1]["accuracy_delta"] == whole["results"][1]["accuracy_delta"]
    other = report([3, 4], "c")
    other["results"][1]["instances"][0]["output"] = "another answer"
    with pytest.raises(ValueError, match="different outputs"):
        pool([report([0, 3], "a"), other])
    with pytest.raises(ValueError, match="differ in seed"):
        pool([report([0], "a"), dict(report([1], "b"), seed=2)])


def test_scoring_cost_times_a_kept_weights_step():
    scoring = tool("scoring_cost")
    queries = mx.random.normal((1, 4, 8, 16))
    seconds = scoring.kept_step_time(queries, kv_heads=2, head_dim=16, length=100, scale=0.25)
    assert 0 < seconds < 5


def test_cpu_matmul_dtypes_times_every_weight_format():
    seconds = tool("cpu_matmul_dtypes").measure(rows=1, repeats=1)
    assert list(seconds) == ["float32", "bfloat16", "float16", "q4"]
    assert all(0 < s < 5 for s in seconds.values())


def test_plot_frontier_merges_methods_of_reports_on_the_same_prompts():
    merge = tool("plot_frontier").merge

    def report(methods, num=4, length=4096):
        rows = [dict(length=length, method=m, accuracy=a) for m, a in methods]
        return dict(model="m", tasks=["passkey"], num=num, seed=1, lengths=[length], results=rows)

    first = report([("baseline", 50.0), ("default", 60.0)])
    later = report([("baseline", 50.0), ("budget", 70.0)])
    merged = merge([first, later])
    assert sorted(r["method"] for r in merged["results"]) == ["baseline", "budget", "default"]
    with pytest.raises(SystemExit, match="different prompts"):
        merge([first, report([("budget", 70.0)], num=8)])


def test_compare_methods_pairs_two_methods_of_one_report():
    compare = tool("compare_methods").compare

    prompts = [("passkey", 0), ("passkey", 1), ("code", 0)]

    def method(name, scores, fraction):
        return dict(method=name, instances=[
            dict(task=t, index=i, score=s, output=f"{t}{i}{s}", prefill_fraction=fraction)
            for (t, i), s in zip(prompts, scores)])  # fmt: skip

    report = dict(results=[method("hand", [1, 1, 0.5], 0.4), method("auto", [1, 0, 0.5], 0.6)])
    result = compare(report, "hand", "auto")
    assert result["prompts"] == 3 and result["identical"] == 2
    assert result["delta"] == pytest.approx(-25.0)  # passkey -50, code 0: task-averaged
    assert result["prefill"] == [pytest.approx(0.4), pytest.approx(0.6)]
