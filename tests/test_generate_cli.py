"""`lazyllm-mlx generate` on a tiny model: what --compare claims, and mlx-lm's generate flags."""

from __future__ import annotations

import json

from lazyllm_mlx.cli import main

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, tiny_model, tiny_tokenizer

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


def tokens_of(out: str) -> list[int]:
    (run,) = json.loads(out)["runs"].values()
    return run["tokens"]


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        (["--max-kv-size", "64"], dict(max_kv_size=64)),
        (
            ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"],
            dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0),
        ),
    ],
)
def test_kv_cache_flags_work_with_plain_mlx_lm_and_are_refused_by_the_lazy_engine(
    monkeypatch, capsys, flags, options
):
    model, tokenizer = (
        tiny_model("llama", num_attention_heads=2, num_key_value_heads=1),
        tiny_tokenizer(),
    )
    monkeypatch.setattr("lazyllm_mlx.cli.generate.load", lambda *a, **k: (model, tokenizer))
    argv = ["generate", "-p", LONG, "--max-tokens", "8", "--json", *flags]
    code, out, _ = run_cli(capsys, *argv, "--schedule", "off")
    assert code == 0
    prompt = mx.array(tokenizer.encode(LONG), dtype=mx.int32)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=8, **options)]
    assert tokens_of(out) == expected[: len(tokens_of(out))]
    for extra in (["--schedule", "paper"], [], ["--compare", "--schedule", "off"]):
        code, _, err = run_cli(capsys, *argv, *extra)
        assert code == 2 and "lazy engine keeps the KV of every token" in err, err


def test_a_draft_model_is_refused_with_the_reason(tiny, capsys):
    code, _, err = run_cli(capsys, "generate", "--draft-model", "small", "--schedule", "off")
    assert code == 2 and "speculative decoding" in err and "mlx_lm.generate" in err


def test_extra_eos_tokens_end_the_generation(tiny, capsys):
    argv = ["generate", "-p", LONG, "--max-tokens", "6", "--json", "--schedule", "paper"]
    code, out, _ = run_cli(capsys, *argv)
    free = tokens_of(out)
    stop = tiny[1].decode([free[2]])  # a word of the tiny vocabulary, e.g. "t42"
    code, out, _ = run_cli(capsys, *argv, "--extra-eos-token", stop)
    report = json.loads(out)["runs"]["lazy"]
    assert code == 0 and report["tokens"] == free[: free.index(free[2])]
    assert report["finish_reason"] == "stop"
    code, _, err = run_cli(capsys, *argv, "--extra-eos-token", "not-a-token-here")
    assert code == 2 and "--extra-eos-token" in err and "not a token" in err


def test_trust_remote_code_is_passed_only_when_asked(monkeypatch, capsys):
    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr("lazyllm_mlx.cli.generate.load", load)
    for flags in ([], ["--trust-remote-code"]):
        assert run_cli(capsys, "generate", "-p", "t5 t6", "--max-tokens", "1", *flags)[0] == 0
    assert calls[0].get("trust_remote_code", False) is False
    assert calls[1]["trust_remote_code"] is True
    assert calls[1]["tokenizer_config"] == {"trust_remote_code": True}


def write_adapter(folder, model) -> None:
    """A LoRA adapter in mlx-lm's layout, with non-zero weights (so it changes the output)."""
    config = {"rank": 4, "scale": 4.0, "dropout": 0.0}
    model.freeze()  # as mlx-lm's trainer: only the LoRA weights stay trainable
    linear_to_lora_layers(model, 4, config)
    rng = np.random.default_rng(0)
    weights = {
        name: mx.array(rng.standard_normal(w.shape).astype(np.float32) * 0.5)
        for name, w in tree_flatten(model.trainable_parameters())
    }
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    meta = {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": config}
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def test_an_adapter_runs_through_the_lazy_engine(tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(folder, tiny_model("llama"))
    save_config({**COMMON, **FAMILY_CONFIGS["llama"]}, folder / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(folder)
    write_adapter(tmp_path / "adapter", tiny_model("llama"))
    argv = ["generate", "--model", str(folder), "-p", LONG, "--max-tokens", "6", "--json"]
    plain = tokens_of(run_cli(capsys, *argv, "--schedule", "none")[1])
    code, out, _ = run_cli(capsys, *argv, "--schedule", "none", "--adapter-path",
                           str(tmp_path / "adapter"))  # fmt: skip
    adapted = tokens_of(out)
    model, tokenizer = mlx_lm.load(str(folder), adapter_path=str(tmp_path / "adapter"))
    prompt = mx.array(tokenizer.encode(LONG), dtype=mx.int32)
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=6)]
    assert code == 0 and adapted != plain and adapted == expected[: len(adapted)]
    code, _, _ = run_cli(capsys, *argv, "--schedule", "paper", "--adapter-path",
                         str(tmp_path / "adapter"))  # fmt: skip
    assert code == 0


def test_xtc_and_a_prefilled_response_as_mlx_lm_generate_takes_them(monkeypatch, capsys):
    from test_server import chat_tokenizer

    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    monkeypatch.setattr("lazyllm_mlx.cli.generate.load", lambda *a, **k: (model, tokenizer))
    argv = ["generate", "-p", "t5 t6", "--max-tokens", "3", "--json", "--schedule", "off"]
    code, out, _ = run_cli(capsys, *argv)
    plain = json.loads(out)["prompt_tokens"]
    code, out, _ = run_cli(capsys, *argv, "--prefill-response", "t9 t9 t9")
    # the assistant's turn is open and holds the prefill: no generation prompt after it
    assert code == 0 and json.loads(out)["prompt_tokens"] != plain
    code, out, _ = run_cli(capsys, *argv, "--temp", "1", "--xtc-probability", "1",
                           "--xtc-threshold", "0.05", "--seed", "3")  # fmt: skip
    assert code == 0 and len(json.loads(out)["runs"]["baseline"]["tokens"]) == 3
    with pytest.raises(SystemExit):
        main([*argv, "--xtc-probability", "2"])
    assert "--xtc-probability: expected a number between 0 and 1" in capsys.readouterr().err
    code, _, err = run_cli(capsys, *argv, "--prefill-response", "t9", "--ignore-chat-template")
    assert code == 2 and "--prefill-response continues the assistant's turn" in err
