"""`lazyllm-mlx generate` on a tiny model: what --compare claims, and mlx-lm's generate flags."""

from __future__ import annotations

import json

from lazyllm_mlx.cli import main

import pytest
from tiny_models import tiny_model, tiny_tokenizer

LONG = " ".join(f"t{5 + (7 * i) % 120}" for i in range(300))


@pytest.fixture
def tiny(monkeypatch):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr("lazyllm_mlx.cli.generate.load", lambda *a, **k: (model, tokenizer))
    return model, tokenizer


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_on_a_short_prompt_says_nothing_was_pruned(tiny, capsys):
    code, out, _ = run_cli(
        capsys, "generate", "--compare", "-p", "t5 t6 t7 t8", "--max-tokens", "2",
        "--schedule", "default",
    )  # fmt: skip
    assert code == 0
    assert "nothing was pruned: the prompt's 4 tokens are fewer than the schedule's min=256" in out
    assert "TTFT speed-up" in out and "×" not in out.split("TTFT speed-up")[1].splitlines()[0]
    code, out, _ = run_cli(
        capsys, "generate", "--compare", "-p", "t5 t6", "--max-tokens", "2", "--json",
    )  # fmt: skip
    assert json.loads(out)["pruned"] is False


def test_compare_on_a_long_prompt_claims_its_speed_up(tiny, capsys):
    code, out, _ = run_cli(
        capsys, "generate", "--compare", "-p", LONG, "--max-tokens", "2", "--schedule", "paper",
    )  # fmt: skip
    assert code == 0 and "nothing was pruned" not in out
    line = out.split("TTFT speed-up")[1].splitlines()[0]
    assert "×" in line
