"""convert() and `lazyllm-mlx convert`: GGUF and HF folders to MLX folders both loaders read, with
quantization, dtypes, a stored schedule, and safe writes."""

from __future__ import annotations

import importlib
import json
import warnings

from lazyllm_mlx import cli, convert, generate_step, load, quantization_check
from lazyllm_mlx.config import LazyConfig
from lazyllm_mlx.convert import QuantizationWarning
from lazyllm_mlx.generate import resolve_schedule
from lazyllm_mlx.gguf.loader import load_gguf
from lazyllm_mlx.quantization_check import THRESHOLD

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from gguf_fixtures import write_tiny_gguf
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_generate_step
from mlx_lm.utils import save_config, save_model
from tiny_models import COMMON, FAMILY_CONFIGS, random_prompt, tiny_gpt2, tiny_model, tiny_tokenizer

CONVERT_MODULE = importlib.import_module(
    "lazyllm_mlx.convert"
)  # the package's `convert` is a function
PROMPT = random_prompt(40, vocab=40)  # within the tiny GGUF vocabularies
WIDE = dict(hidden_size=128, intermediate_size=256)  # every quantization group size divides it


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {
        arch: write_tiny_gguf(folder / f"{arch}.gguf", arch, n_layers=6).path
        for arch in ("llama", "gemma3")
    }


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny llama folder as an HF checkpoint is laid out, declaring bfloat16 weights."""
    folder = tmp_path_factory.mktemp("hf")
    model = tiny_model("llama", **WIDE)
    save_model(folder, model)
    config = {**COMMON, **FAMILY_CONFIGS["llama"], **WIDE, "torch_dtype": "bfloat16"}
    save_config(config, folder / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(folder)
    return folder


def saved_dtypes(folder) -> set:
    weights = mx.load(str(folder / "model.safetensors"))
    return {w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)}


def tokens_match_mlx_lm(model, lazy, prompt=PROMPT, max_tokens=16) -> bool:
    expected = [t for t, _ in mlx_generate_step(prompt, model, max_tokens=max_tokens)]
    got = [t for t, _ in generate_step(prompt, model, lazy=lazy, max_tokens=max_tokens)]
    return got == expected


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_to_float16_folder_that_both_loaders_read(tmp_path, gguf_files, arch):
    out = convert(gguf_files[arch], tmp_path / "out", schedule="paper")
    assert out == tmp_path / "out" and leftovers(tmp_path) == []
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and "quantization" not in config
    assert config["lazyllm"] == LazyConfig.preset("paper").to_dict()
    assert saved_dtypes(out) == {mx.float16}  # GGUF default: float16

    ours, our_tokenizer = load(out)
    theirs, their_tokenizer = mlx_lm.load(str(out))
    source, source_tokenizer = load_gguf(gguf_files[arch])
    assert type(ours) is type(theirs) is type(source)
    expected = dict(tree_flatten(source.parameters()))
    for name, weight in tree_flatten(ours.parameters()):
        assert mx.array_equal(weight, expected[name].astype(mx.float16).astype(mx.float32)), name
    text = "the cat 12 at"
    expected_ids = source_tokenizer.encode(text)
    assert our_tokenizer.encode(text) == their_tokenizer.encode(text) == expected_ids
    assert their_tokenizer.eos_token_ids == source_tokenizer.eos_token_ids
    assert their_tokenizer.chat_template == source_tokenizer.chat_template

    assert resolve_schedule(ours, None) == LazyConfig.preset("paper")
    assert tokens_match_mlx_lm(ours, "none")


def test_gguf_to_float32_keeps_the_exact_weights(tmp_path, gguf_files):
    out = convert(gguf_files["llama"], tmp_path / "out", dtype="float32")
    assert saved_dtypes(out) == {mx.float32}
    model, _ = load(out)
    source, _ = load_gguf(gguf_files["llama"], mx.float32)
    prompt = PROMPT[None]
    assert mx.array_equal(model(prompt), source(prompt))
    assert not hasattr(model, "lazyllm_schedule")


def test_hf_folder_keeps_the_source_dtype(tmp_path, hf_folder):
    out = convert(hf_folder, tmp_path / "out")
    assert saved_dtypes(out) == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("t5 t7 t9") == tiny_tokenizer().encode("t5 t7 t9")
    assert mx.array_equal(
        model.model.embed_tokens.weight,
        tiny_model("llama", **WIDE).model.embed_tokens.weight.astype(mx.bfloat16),
    )


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 128)])
def test_quantized_conversion_runs_exactly_through_the_lazy_path(
    tmp_path, hf_folder, bits, group_size
):
    out = convert(
        hf_folder,
        tmp_path / "q",
        quantize=True,
        q_bits=bits,
        q_group_size=group_size,
        dtype="float32",
        schedule="3:0.5,6:0.5",
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    for loader in (load, mlx_lm.load):
        model, _ = loader(str(out))
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits
        assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
        assert q_proj.group_size == group_size
    model, _ = load(out)
    prompt = random_prompt(120)
    assert tokens_match_mlx_lm(model, "none", prompt, 24)
    assert tokens_match_mlx_lm(model, LazyConfig((3, 6, 9), (0.99999,) * 3), prompt, 24)
    assert resolve_schedule(model, None) == LazyConfig.parse("3:0.5,6:0.5")


def test_mixed_bit_recipe(tmp_path, hf_folder):
    out = convert(hf_folder, tmp_path / "q", quantize=True, quant_predicate="mixed_3_6")
    config = json.loads((out / "config.json").read_text())
    bits = {v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert bits == {3, 6}
    model, _ = load(out)
    assert tokens_match_mlx_lm(model, "none", random_prompt(60), 8)


def test_dequantize_writes_the_quantized_weights_in_floating_point(tmp_path, hf_folder, capsys):
    quantized = convert(hf_folder, tmp_path / "q", quantize=True, q_bits=8, dtype="float32")
    argv = ["convert", "--model", str(quantized), "--mlx-path", str(tmp_path / "d"), "-d"]
    assert cli.main([*argv, "--dtype", "float32"]) == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert saved_dtypes(tmp_path / "d") == {mx.float32}
    convert(quantized, tmp_path / "stored", dequantize=True)
    assert saved_dtypes(tmp_path / "stored") == {mx.bfloat16}  # config.json's, as mlx-lm's
    source, _ = mlx_lm.load(str(quantized))
    for loader in (load, mlx_lm.load):
        model, _ = loader(str(tmp_path / "d"))
        q, d = source.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
        assert type(d) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
        assert mx.array_equal(d.weight, mx.dequantize(q.weight, q.scales, q.biases, 64, 8))
    with pytest.raises(SystemExit):  # argparse: one or the other, before anything loads
        cli.main([*argv, "-q"])
    assert "-q/--quantize: not allowed with argument -d/--dequantize" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both"):
        convert(quantized, tmp_path / "e", quantize=True, dequantize=True)


def test_upload_repo_is_refused_with_the_command_that_does_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lazyllm_mlx.cli.convert.convert", lambda *a, **k: pytest.fail("ran"))
    argv = ["convert", "--mlx-path", str(tmp_path / "m"), "--upload-repo", "me/model"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--upload-repo is not supported" in err
    assert f"mlx_lm.upload --path {tmp_path / 'm'} --upload-repo me/model" in err


def test_refuses_to_overwrite_unless_asked(tmp_path, gguf_files):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(gguf_files["llama"], target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "keep.txt"]
    convert(gguf_files["llama"], target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").stat().st_size > 2
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_a_model_folder(tmp_path, gguf_files):
    """--overwrite on a folder of something else (a home folder, a project) or on a file is
    refused before any work; a symlink to a model folder is followed and stays a link."""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OSError, match="not a model folder"):
        convert(gguf_files["llama"], other, overwrite=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    with pytest.raises(OSError, match="not a folder"):
        convert(gguf_files["llama"], plain, overwrite=True)
    assert plain.read_text() == "mine"
    real = tmp_path / "real"
    convert(gguf_files["llama"], real)
    link = tmp_path / "link"
    link.symlink_to(real)
    convert(gguf_files["llama"], link, overwrite=True)
    assert link.is_symlink() and (real / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_a_schedule_that_does_not_fit_is_refused_before_writing(tmp_path, gguf_files):
    with pytest.raises(ValueError, match="collapse|outside"):
        convert(gguf_files["llama"], tmp_path / "out", schedule="1:0.5,2:0.5,3:0.5,4:0.5,9:0.5")
    assert list(tmp_path.iterdir()) == []


def test_a_schedule_for_an_unprunable_family_is_refused(tmp_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    config, model = tiny_gpt2()
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="cannot prune model type 'gpt2'"):
        convert(folder, tmp_path / "out", schedule="paper")
    assert not (tmp_path / "out").exists()
    convert(folder, tmp_path / "out")  # without a schedule any mlx-lm model converts
    assert mlx_lm.load(str(tmp_path / "out"))[0].model_type == "gpt2"


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path, gguf_files, monkeypatch):
    import mlx_lm.utils

    def failing_save(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(mlx_lm.utils, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert(gguf_files["llama"], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        convert(gguf_files["llama"], tmp_path / "old", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "mine"


def test_bad_arguments(tmp_path, gguf_files):
    with pytest.raises(ValueError, match="need -q"):
        convert(gguf_files["llama"], tmp_path / "out", q_bits=4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert(gguf_files["llama"], tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match="is the source model"):
        convert(tmp_path, tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="Unknown LazyLLM preset|Bad schedule"):
        convert(gguf_files["llama"], tmp_path / "out", schedule="fastest")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(q_group_size=7), "--q-group-size 7 / --q-bits 4 .affine.: The requested group"),
        (dict(q_bits=7), "--q-bits 7 .affine.: The requested number of bits 7 is not supported"),
        (dict(q_bits=0), "both must be positive"),
        (dict(q_mode="mxfp4", q_group_size=64), "mxfp4 quantization requires group size 32"),
        (dict(q_mode="int3"), "--q-mode must be one of"),
    ],
)
def test_quantization_mlx_cannot_do_is_refused_before_loading(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "not-loaded.gguf", tmp_path / "out", quantize=True, **options)
    assert list(tmp_path.iterdir()) == []


def test_a_group_size_no_layer_divides_writes_nothing(tmp_path, gguf_files):
    # The tiny models' rows are 64 and 256 wide: groups of 128 fit only some of them ...
    convert(gguf_files["llama"], tmp_path / "some", quantize=True, q_group_size=128)
    assert any(k.endswith(".scales") for k in mx.load(str(tmp_path / "some/model.safetensors")))
    # ... and a model whose rows no group size divides is refused rather than left unquantized.
    odd = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2)
    folder = tmp_path / "odd"
    save_model(folder, tiny_model("llama", **odd))
    save_config({**COMMON, **FAMILY_CONFIGS["llama"], **odd}, folder / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="No layer could be quantized with groups of 32"):
        convert(folder, tmp_path / "out", quantize=True, q_group_size=32, q_bits=8)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_unwritable_target_is_named_not_its_temporary_folder(tmp_path, gguf_files):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot write {blocker / 'out'}") as error:
        convert(gguf_files["llama"], blocker / "out")
    assert ".partial" not in str(error.value)


def test_progress_bar_only_when_asked(tmp_path, gguf_files, capsys):
    convert(gguf_files["llama"], tmp_path / "a", progress=False)
    assert capsys.readouterr().err == ""
    convert(gguf_files["llama"], tmp_path / "b", progress=True)
    err = capsys.readouterr().err
    assert "Loading llama.gguf" in err and "Converting" in err and "7/7" in err


def test_cli_convert_then_generate_uses_the_stored_schedule(tmp_path, gguf_files, capsys):
    out = tmp_path / "cli"
    argv = [
        "convert",
        "--model",
        str(gguf_files["llama"]),
        "--mlx-path",
        str(out),
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
        "--schedule",
        "2:0.5;min=4",
    ]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert f"Saved {out}" in said and "schedule 2:0.5;min=4)" in said  # what was stored
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    assert LazyConfig.from_dict(config["lazyllm"]) == LazyConfig.parse("2:0.5;min=4")

    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--dtype", "float32"]) == 0
    capsys.readouterr()

    generate = [
        "generate",
        "--model",
        str(out),
        "--prompt",
        "the cat at the",
        "--max-tokens",
        "3",
        "--ignore-chat-template",
        "--json",
    ]
    from lazyllm_mlx import _platform

    _platform._warned.discard("quantized")  # said once per process
    assert cli.main(generate) == 0
    output = capsys.readouterr()
    report = json.loads(output.out)
    assert "weights are quantized: on the CPU" in output.err  # our CPU's slow path, said once
    assert list(report["runs"]) == ["lazy"]
    assert report["runs"]["lazy"]["schedule"] == "2:0.5;min=4"


def test_the_default_model_converts_with_its_tokenizer(tmp_path):
    """SmolLM2 (GGUF Q4_1) to a 4-bit folder: config, weights and the tokenizer survive."""
    from lazyllm_mlx.default_model import default_model_path
    from lazyllm_mlx.gguf.reader import read_header
    from lazyllm_mlx.gguf.tokenizer import build_tokenizer

    from mlx_lm.utils import load_tokenizer

    out = convert(
        None, tmp_path / "smollm2", quantize=True, schedule="default", quality_check=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    from lazyllm_mlx.calibration import CALIBRATED

    calibration = LazyConfig.parse(CALIBRATED["llama", 30, 576, 9, 3]["default"])
    assert LazyConfig.from_dict(config["lazyllm"]) == calibration  # the preset as it applies here
    assert config["quantization"]["bits"] == 4
    assert mx.load(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == mx.uint32

    source = build_tokenizer(read_header(default_model_path()).metadata)
    saved = load_tokenizer(out, eos_token_ids=config["eos_token_id"])
    messages = [{"role": "user", "content": "Where is the lighthouse? 42 ünïcödé\n\tok"}]
    text = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert saved.encode(text, add_special_tokens=False) == source.encode(
        text, add_special_tokens=False
    )
    assert saved.eos_token_ids == source.eos_token_ids
    assert saved.bos_token == source.bos_token


def test_the_quality_check_simulates_mlx_lm_s_quantization_exactly(gguf_files):
    from mlx_lm.utils import quantize_model

    model, tokenizer = load_gguf(gguf_files["llama"], mx.float32)
    tokens = tokenizer.encode(quantization_check.TEXT)[:64]
    before = dict(tree_flatten(model.parameters()))
    layers = quantization_check.plan(model, 32, 4, "affine", None)
    simulated = quantization_check.simulated_perplexity(model, tokens, layers, before)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the model is left as it was
    quantized, _ = quantize_model(model, {}, 32, 4)
    assert simulated == pytest.approx(quantization_check.perplexity(quantized, tokens), rel=1e-3)


def test_the_quality_check_flags_the_default_model_at_4_bits_in_groups_of_64(smollm2):
    """The documented case: SmolLM2 re-quantized at 4 bits, groups of 64, names no capital."""
    model, tokenizer, _ = smollm2
    check = quantization_check.check_quantization(model, tokenizer, 64, 4)
    assert check.degraded and check.suggestion is not None
    assert check.tried[next(reversed(check.tried))] / check.source - 1 <= THRESHOLD
    assert "raises the perplexity by" in check.warning() and check.suggestion in check.warning()


def fake_check(increase: float):
    def check(model, tokenizer, group, bits, mode, predicate):
        calls.append((group, bits, mode))
        return quantization_check.Check(10.0, 10.0 * (1 + increase), "4 bits, groups of 64",
                                        suggestion="--q-bits 8 --q-group-size 64 (x)")  # fmt: skip

    calls = []
    return check, calls


def test_convert_warns_when_quantization_hurts_and_says_what_would_not(
    tmp_path, gguf_files, monkeypatch, capsys
):
    check, calls = fake_check(0.5)
    monkeypatch.setattr(CONVERT_MODULE, "check_quantization", check)
    reports = []
    with pytest.warns(QuantizationWarning, match="raises the perplexity by 50%.*--q-bits 8"):
        convert(gguf_files["llama"], tmp_path / "a", quantize=True, report=reports.append)
    assert calls == [(64, 4, "affine")] and "source 10.00, converted 15.00" in reports[0]
    argv = ["convert", "--hf-path", str(gguf_files["llama"]), "-q", "--q-group-size", "32"]
    assert cli.main([*argv, "--mlx-path", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "lazyllm-mlx convert: perplexity on the built-in text" in err
    assert "lazyllm-mlx convert: warning: quantization with" in err and calls[-1][0] == 32
    assert cli.main([*argv, "--mlx-path", str(tmp_path / "c"), "--no-quality-check"]) == 0
    assert len(calls) == 2 and "warning" not in capsys.readouterr().err
    fine, calls = fake_check(0.02)
    monkeypatch.setattr(CONVERT_MODULE, "check_quantization", fine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        convert(gguf_files["llama"], tmp_path / "d", quantize=True)
