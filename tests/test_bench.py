"""`lazyllm-mlx bench` smoke run on the real default model (a tiny configuration, not a timing)."""

import json

from lazyllm_mlx.cli import main
from lazyllm_mlx.evals.bench import format_table
from lazyllm_mlx.evals.sources import real_text_tokens


def test_real_text_prompt_has_the_asked_length(smollm2):
    _, tokenizer, _ = smollm2
    tokens = real_text_tokens(tokenizer, 300)
    assert len(tokens) == 300 and tokens == real_text_tokens(tokenizer, 500)[:300]
    assert "the" in tokenizer.decode(tokens)


def test_bench_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--lengths", "96", "--schedules", "paper", "--runs", "1", "--max-tokens", "20",
         "--json", str(out), "--plot-dir", str(tmp_path), "--quiet"]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    methods = [row["method"] for row in data["rows"]]
    assert methods == ["baseline", "paper", "paper;norevive"]
    paper = data["rows"][1]
    assert paper["prefill_fraction"] < 1 and paper["ideal_speedup"] > 1
    assert paper["speedup"] > 0 and paper["measured_over_ideal"] > 0 and paper["total_speedup"] > 0
    base = data["rows"][0]
    assert base["total_time"] > base["short_total_time"] > base["ttft"]
    assert base["generated_tokens"] == 20 and base["short_decode_tps"] > 0
    assert paper["short_decode_vs_baseline"] > 0 and paper["short_total_speedup"] > 0
    assert len(paper["tokens_per_layer"]) == 30 and paper["tokens_per_layer"][0] == 96
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert (tmp_path / "tokens_per_layer.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "paper;norevive" in printed and format_table(data["rows"]).splitlines()[0] in printed
