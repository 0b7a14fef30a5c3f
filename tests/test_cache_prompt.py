"""`lazyllm-mlx cache-prompt` and `generate --prompt-cache-file` through the CLI (tiny folders)."""

from __future__ import annotations

import json
from pathlib import Path

from lazyllm_mlx import load, stream_generate
from lazyllm_mlx.cli import main
from lazyllm_mlx.document_cache import document_tokens, query_tokens
from lazyllm_mlx.prompt_cache import load_lazy_cache

import pytest
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, tiny_model, tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}t2 {% else %}t3 {% endif %}"
    "{{ m['content'] }} t4 {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
)
DOCUMENT = " ".join(f"t{5 + (11 * i) % 120}" for i in range(200))
QUESTION = " t9 t10 t11"
EXAMPLES = Path(__file__).parent.parent / "examples"


def write_folder(folder, seed=0):
    save_model(folder, tiny_model("llama", seed=seed))
    save_config({**COMMON, **FAMILY_CONFIGS["llama"]}, folder / "config.json")
    hf = tiny_tokenizer()._tokenizer
    hf.chat_template = TEMPLATE
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cached(folder, tmp_path_factory):
    """A document cached with each schedule: {schedule: file}."""
    files = {}
    for schedule in ("none", "paper"):
        path = tmp_path_factory.mktemp("cache") / f"{schedule}.safetensors"
        argv = ["cache-prompt", "--model", str(folder), "--prompt", DOCUMENT]
        assert main([*argv, "--prompt-cache-file", str(path), "--schedule", schedule]) == 0
        files[schedule] = path
    return files


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_from_the_cache_equals_one_whole_prefill(folder, cached, capsys):
    code, out, _ = run_cli(
        capsys, "generate", "--prompt-cache-file", str(cached["none"]), "--prompt", QUESTION,
        "--max-tokens", "3", "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert report["cached_tokens"] == 201 and report["prompt_tokens"] == 5  # 3 words + t4 t3
    (run,) = report["runs"].values()
    model, tokenizer = load(folder)
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": DOCUMENT + QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
    )
    tokens = tokenizer.encode(whole, add_special_tokens=False)
    expected = [r.token for r in stream_generate(model, tokenizer, tokens, 3, lazy="none")]
    assert run["tokens"] == [t for t in expected if t not in tokenizer.eos_token_ids]


def test_the_file_records_what_it_holds(folder, cached):
    model, tokenizer = load(folder)
    cache, metadata = load_lazy_cache(cached["paper"], model)
    assert cache.config.name == "paper" and cache.offset == 201
    assert metadata["model"] == str(folder.resolve())
    assert metadata["prefix"] == f"t2 {DOCUMENT}" and metadata["prefix_tokens"] == "201"
    assert cache.tokens_per_layer()[-1] < 201  # the document was pruned


def test_generate_takes_model_and_schedule_from_the_file(cached, capsys):
    code, out, _ = run_cli(
        capsys, "generate", "--prompt-cache-file", str(cached["paper"]), "-p", QUESTION,
        "--max-tokens", "2", "--json",
    )  # fmt: skip
    assert code == 0
    (run,) = json.loads(out)["runs"].values()
    assert run["schedule"] == "0.3:0.7,0.6:0.7,0.9:0.7" and run["generation_tokens"] >= 1
    code, out, _ = run_cli(
        capsys, "generate", "--prompt-cache-file", str(cached["paper"]), "-p", QUESTION,
        "--max-tokens", "2", "--json", "--schedule", "paper;norevive",
    )  # fmt: skip
    assert code == 0  # same stages, other decoding options: allowed, and used
    assert json.loads(out)["runs"]["lazy"]["schedule"].endswith(";norevive")


def test_mismatches_and_broken_files_are_clear_errors(folder, cached, capsys, tmp_path):
    other = write_folder(tmp_path / "other", seed=7)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a cache")
    paper = str(cached["paper"])
    cases = [
        (["--prompt-cache-file", paper, "--schedule", "none"], "built with schedule"),
        (["--prompt-cache-file", paper, "--model", str(other)], "different model"),
        (["--prompt-cache-file", paper, "--schedule", "off"], "cannot continue it"),
        (["--prompt-cache-file", paper, "--compare"], "cannot use --prompt-cache-file"),
        (["--prompt-cache-file", str(garbage), "--model", str(folder)], "not a readable"),
        (["--prompt-cache-file", str(tmp_path / "missing.safetensors")], "not found"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(capsys, "generate", "-p", QUESTION, "--max-tokens", "2", *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    code, _, err = run_cli(
        capsys, "cache-prompt", "--model", str(folder), "-p", DOCUMENT, "--schedule", "off",
        "--prompt-cache-file", str(tmp_path / "x.safetensors"),
    )  # fmt: skip
    assert code == 2 and "not 'off'" in err


def test_the_file_keeps_the_adapter_and_end_token_for_the_next_turn(folder, capsys, tmp_path):
    from test_generate_cli import write_adapter

    write_adapter(tmp_path / "adapter", tiny_model("llama"))
    path = str(tmp_path / "c.safetensors")
    argv = ["cache-prompt", "--model", str(folder), "-p", DOCUMENT, "--prompt-cache-file", path,
            "--schedule", "none", "--adapter-path", str(tmp_path / "adapter")]  # fmt: skip
    turn = ["generate", "--prompt-cache-file", path, "-p", QUESTION, "--max-tokens", "6", "--json"]
    assert run_cli(capsys, *argv)[0] == 0
    code, out, err = run_cli(capsys, *turn)  # a model without the adapter would not match
    assert code == 0, err
    free = json.loads(out)["runs"]["lazy"]["tokens"]
    code, out, _ = run_cli(capsys, *turn, "--adapter-path", str(tmp_path / "adapter"))
    assert json.loads(out)["runs"]["lazy"]["tokens"] == free
    stop = tiny_tokenizer().decode([free[2]])
    assert run_cli(capsys, *argv, "--eos-token", stop)[0] == 0
    code, out, _ = run_cli(capsys, *turn)
    run = json.loads(out)["runs"]["lazy"]
    assert run["tokens"] == free[: free.index(free[2])] and run["finish_reason"] == "stop"
    code, _, err = run_cli(capsys, *argv, "--eos-token", "not-a-token-here")
    assert code == 2 and "--eos-token: 'not-a-token-here' is not a token" in err


def test_generate_stops_at_an_mlx_lm_cache_s_eos_token(folder, tmp_path):
    from lazyllm_mlx.document_cache import cached_loading

    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

    path = str(tmp_path / "mlx.safetensors")
    metadata = {"model": str(folder), "tokenizer_config": json.dumps({"eos_token": "t9"})}
    save_prompt_cache(path, make_prompt_cache(tiny_model("llama")), metadata)
    saved = cached_loading(path)
    assert (saved.model, saved.adapter_path, saved.eos_tokens) == (str(folder), None, ["t9"])


def test_prefix_and_query_join_into_the_whole_prompt_on_the_real_template(smollm2):
    """On SmolLM2's own template (a default system prompt, ChatML turns)."""
    _, tokenizer, _ = smollm2
    document, question = "A short document about lighthouses.", "\nWho kept the light?"
    prefix, cached = document_tokens(tokenizer, document, None, {})
    assert prefix.endswith(document) and "<|im_start|>user\n" in prefix
    rest = query_tokens(tokenizer, question, None, {})
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": document + question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(cached + rest) == whole
    assert tokenizer.decode(rest) == question + "<|im_end|>\n<|im_start|>assistant\n"


def test_default_model_end_to_end(smollm2, monkeypatch, capsys, tmp_path):
    """~200 tokens of a real document cached without --model, then continued with a question."""
    model, tokenizer, _ = smollm2
    loaded = []

    def load_default(path=None):
        loaded.append(path)
        return model, tokenizer

    monkeypatch.setattr("lazyllm_mlx.cli.generate.load", load_default)  # both commands' loader
    with open(EXAMPLES / "long_document.txt", encoding="utf-8") as f:
        document = f.read(900)
    question = "\n\nQuestion: What is the population of Carrow Sands?"
    path = tmp_path / "doc.safetensors"
    argv = ["cache-prompt", "-p", document, "--prompt-cache-file", str(path), "--schedule", "none"]
    assert run_cli(capsys, *argv)[0] == 0
    code, out, err = run_cli(
        capsys, "generate", "--prompt-cache-file", str(path), "-p", question, "--max-tokens", "3",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    assert loaded == [None, None]  # the file names the default model as ""
    (run,) = json.loads(out)["runs"].values()
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": document + question}],
        tokenize=False,
        add_generation_prompt=True,
    )
    tokens = tokenizer.encode(whole, add_special_tokens=False)
    expected = [r.token for r in stream_generate(model, tokenizer, tokens, 3, lazy="none")]
    assert run["tokens"] == [t for t in expected if t not in tokenizer.eos_token_ids]
