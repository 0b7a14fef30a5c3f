"""Bad command lines end in one clear line naming the flag, before any model is loaded."""

from __future__ import annotations

from lazyllm_mlx import LazyConfig
from lazyllm_mlx.cli import main

import pytest


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    for command in ("generate", "cache_prompt", "serve", "bench", "eval", "convert"):
        module = __import__(f"lazyllm_mlx.cli.{command}", fromlist=["run"])
        for name in ("load", "convert"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--prefill-step-size", "0"], "--prefill-step-size: expected a positive"),
        (["serve", "--prefill-step-size", "-3"], "--prefill-step-size: expected a positive"),
        (["generate", "--temp", "-1"], "--temp: expected a number >= 0"),
        (["generate", "--temp", "nan"], "--temp: expected a number >= 0"),
        (["serve", "--temp", "-0.5"], "--temp: expected a number >= 0"),
        (["generate", "--top-p", "1.5"], "--top-p: expected a number between 0 and 1"),
        (["generate", "--min-p", "-0.1"], "--min-p: expected a number between 0 and 1"),
        (["generate", "--top-k", "-2"], "--top-k: expected an integer >= 0"),
        (["generate", "--schedule", ""], "--schedule: the schedule is empty"),
        (["cache-prompt", "-p", "x", "--prompt-cache-file", "c", "--schedule", " "], "empty"),
        (["generate", "--chat-template-config", "{bad"], "--chat-template-config: not valid JSON"),
        (["generate", "--chat-template-config", "[1]"], "--chat-template-config: expected a JSON"),
        (["serve", "--chat-template-args", "{bad"], "--chat-template-args: not valid JSON"),
        (["bench", "--lengths", "abc"], "--lengths: expected comma-separated integers"),
        (["generate", "--no-such-flag"], "lazyllm-mlx generate: error: unrecognized arguments"),
        (["generate", "--seed", "-1"], "--seed: expected an integer from 0 to 2**64 - 1"),
        (["generate", "--seed", str(2**70)], "--seed: expected an integer from 0 to 2**64 - 1"),
        (["generate", "--min-tokens-to-keep", "0"], "--min-tokens-to-keep: expected a positive"),
        (["generate", "--min-tokens-to-keep", "-5"], "--min-tokens-to-keep: expected a positive"),
        (["generate", "--verbose", "maybe"], "--verbose: expected True or False"),
        (["generate", "--kv-bits", "9"], "--kv-bits: invalid choice"),
        (["generate", "--max-tokens", "-2", "--compare", "--json"], "--max-tokens/-m: expected"),
        (["generate", "--chat-template-config", '{"tokenize": true}'], "'tokenize' is set by"),
        (["serve", "--chat-template-args", '{"add_generation_prompt": 0}'], "is set by the"),
        (["generate", "--schedule", "10:inf"], "--schedule: Keep inf is out of range"),
        (["generate", "--schedule", "10:1e30"], "--schedule: Keep 1e+30 is out of range"),
        (["generate", "--schedule", "\uff11\uff10:0.5"], "--schedule: Bad number"),
        (["eval", "--search", "-1"], "--search: expected a number >= 0"),
        (["probe", "--target", "2"], "--target: expected a number between 0 and 1"),
        (["generate", "--prompt", "a\udcffb"], "--prompt is not UTF-8 text"),
        (["generate", "--prompt", "x", "--prompt-file", "f.txt"], "not both"),
        (["generate", "--use-default-chat-template"], "transformers no longer ships default"),
        (["generate", "--num-draft-tokens", "4"], "--num-draft-tokens is not supported: spec"),
        (["generate", "--num-draft-tokens", "0"], "--num-draft-tokens: expected a positive"),
        (["generate", "--image", "a.png"], "--image: not supported: the lazy engine prunes"),
        (["generate", "-qa"], "--quantize-activations/-qa: not supported: activation"),
        (["serve", "--draft-model", "d"], "--draft-model: not supported: speculative decoding"),
        (["serve", "--num-draft-tokens", "2"], "--num-draft-tokens: not supported: speculative"),
        (["serve", "--kv-bits", "4"], "--kv-bits: not supported: the lazy engine keeps the KV"),
        (["serve", "--kv-group-size", "32"], "--kv-group-size: not supported: the lazy engine"),
        (["serve", "--quantized-kv-start", "0"], "--quantized-kv-start: not supported: the lazy"),
        (["serve", "--decode-concurrency", "4"], "--decode-concurrency: not supported: the lazy"),
        (["serve", "--prompt-concurrency", "4"], "--prompt-concurrency: not supported: the lazy"),
        (["serve", "--pipeline"], "--pipeline: not supported: the server runs on one machine"),
        (
            ["cache-prompt", "-p", "x", "--prompt-cache-file", "c", "--kv-bits", "4"],
            "--kv-bits cannot be used with cache-prompt, which saves a LazyLLM cache: the lazy",
        ),  # fmt: skip
        (
            ["cache-prompt", "-p", "x", "--prompt-cache-file", "c", "--max-kv-size", "64"],
            "--max-kv-size cannot be used with cache-prompt",
        ),  # fmt: skip
    ],
)
def test_bad_values_name_their_flag(no_model, capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    line = one_line_error(err)
    assert message in line, err
    if "unrecognized" in message:
        assert "usage: lazyllm-mlx generate" in err  # the command's usage, not the top level's


def test_directories_where_files_are_expected(no_model, capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path))
    assert code == 2 and "--prompt-file" in one_line_error(err) and "is a directory" in err
    code, err = run_cli(capsys, "cache-prompt", "-p", "x", "--prompt-cache-file", str(tmp_path))
    assert code == 2 and "--prompt-cache-file" in err and "is a directory" in one_line_error(err)


def test_unwritable_outputs_are_named_before_any_work(no_model, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    inside = str(blocker / "out")
    missing = str(tmp_path / "no" / "such" / "out.json")
    cases = [
        (["cache-prompt", "-p", "x", "--prompt-cache-file", inside], "--prompt-cache-file"),
        (["bench", "--json", missing], "--json"),
        (["bench", "--plot-dir", inside], "--plot-dir"),
        (["eval", "--json", inside], "--json"),
        (["eval", "--plot", missing], "--plot"),
        (["probe", "--json", inside], "--json"),
        (["convert", "--mlx-path", inside], "--mlx-path"),
    ]
    for argv, flag in cases:
        code, err = run_cli(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and flag in line and "cannot write" in line, (argv, err)
        assert ".partial" not in line and ".safetensors." not in line


def test_a_prompt_file_that_is_not_text(no_model, capsys, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    code, err = run_cli(capsys, "generate", "--prompt-file", str(binary))
    assert code == 2 and "not UTF-8 text" in one_line_error(err)
    code, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "does not exist" in one_line_error(err)


def test_prompts_that_are_not_text_files_are_refused_before_reading(no_model, capsys, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    import io
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for path in (str(fifo), "/dev/zero"):  # /dev/zero would be read until memory ran out
        code, err = run_cli(capsys, "generate", "--prompt-file", path)
        assert code == 2 and "is not a regular file" in one_line_error(err)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    code, err = run_cli(capsys, "generate", "--prompt", "-")
    assert code == 2 and "standard input) is not UTF-8 text" in one_line_error(err)


def test_the_api_refuses_an_empty_schedule_too():
    with pytest.raises(ValueError, match="schedule is empty"):
        LazyConfig.parse("  ")


def test_every_command_s_help_renders(capsys):
    from lazyllm_mlx.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit.value.code == 0 and out.startswith(f"usage: lazyllm-mlx {command}"), command
        assert "object at 0x" not in out and "'prog':" not in out, command  # a stray %
