"""`load()`: the default model, a GGUF file, an MLX/Hugging Face folder or a hub id -> mlx-lm model.

Returns what `mlx_lm.load` returns. On the CPU floating weights are cast to float32 (other float
types are slow there); quantized weights and their scales are left alone. A `"lazyllm"` key in a
folder's config.json (a stored pruning schedule) is carried as `model.lazyllm_schedule`, and the
folder itself as `model.lazyllm_folder` (a calibration may be stored there).
`load_source` is the one path from a source to a model, which `convert` takes too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ._platform import default_dtype
from .default_model import default_model_path
from .gguf.loader import GGUF_DEFAULT_DTYPE, load_gguf
from .safetensors_file import check_safetensors

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load(
    path_or_hf_repo: str | Path | None = None,
    dtype: mx.Dtype | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    return_config: bool = False,
) -> tuple:
    """Load `(model, tokenizer)` (plus the config with `return_config`), like `mlx_lm.load`.

    None loads the embedded default model (SmolLM2-135M-Instruct). `dtype` defaults to float32 on
    the CPU (GGUF weights dequantized); on a GPU, a GGUF file's quantized tensors stay quantized
    (MLX affine, 4 or 8 bits) and its other weights become float16, and other models keep their
    stored dtype.
    """
    model, tokenizer, config, _ = load_source(
        path_or_hf_repo,
        dtype or default_dtype(),
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    if isinstance(config.get("lazyllm"), dict):
        # Not a child module or parameter: keep it out of mlx's parameter tree.
        object.__setattr__(model, "lazyllm_schedule", dict(config["lazyllm"]))
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def load_source(
    source: str | Path | None,
    dtype: mx.Dtype | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    lazy: bool = False,
    progress: bool | None = None,
    quantized: bool | None = None,
    gguf_cache: bool | None = None,
) -> tuple[nn.Module, Any, dict[str, Any], Path]:
    """`(model, tokenizer, config, local path)` of a GGUF file, an MLX/HF folder or a hub id
    (downloaded first); None is the default model. What `load` and `convert` share.

    dtype: of the floating weights; None keeps the stored one (GGUF weights are dequantized to
    float16). lazy: weights are read when first evaluated (convert does it layer by layer).
    progress: a progress bar on stderr while a GGUF file is read (default: when it is a terminal).
    quantized: whether a GGUF file's quantized tensors stay quantized (default: unless the dtype
    is float32, the CPU's). gguf_cache: keep a GGUF file's loaded weights in the user's cache
    folder for the next load (default: unless LAZYLLM_MLX_GGUF_CACHE=0; see gguf.load_cache).
    """
    path = Path(default_model_path() if source is None else source).expanduser()
    if path.is_file():
        if not _is_gguf(path):
            raise ValueError(
                f"{path} is a file but not a GGUF model (give a .gguf file or a folder)"
            )
        model, tokenizer, config = load_gguf(
            path,
            dtype or getattr(mx, GGUF_DEFAULT_DTYPE),
            model_config=model_config,
            tokenizer_config=tokenizer_config,
            progress=progress,
            return_config=True,
            quantized=quantized,
            cache=gguf_cache,
        )
        if adapter_path is not None:
            from mlx_lm.utils import load_adapters

            model = load_adapters(model, adapter_path)
            model.eval()
        return model, tokenizer, config, path

    from mlx_lm.utils import load as mlx_load

    folder = path if path.is_dir() else _download(str(source), revision)
    check_model_folder(folder)
    model, tokenizer, config = mlx_load(
        str(folder),
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        lazy=True,  # cast before reading: the weights arrive in their dtype
        return_config=True,
        trust_remote_code=trust_remote_code,
    )
    if dtype is not None:
        cast_floating(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
    object.__setattr__(model, "lazyllm_folder", str(folder))  # a calibration may be stored there
    return model, tokenizer, config, folder


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True  # load_gguf explains what is wrong with it, if anything
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _download(repo: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS  # what mlx-lm fetches for a hub id

    problem = "it does not exist"
    try:
        validate_repo_id(repo)
        return Path(
            huggingface_hub.snapshot_download(
                repo, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS
            )
        )
    except HFValidationError:
        pass  # a path that does not exist, not a hub id
    except Exception as e:  # noqa: BLE001  (network, auth, missing repo: all mean "unreachable")
        problem = f"the hub says: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise FileNotFoundError(
        f"{repo!r} is neither a file, a folder nor a reachable Hugging Face hub id ({problem})"
    )


def check_model_folder(folder: Path) -> None:
    """Clear errors for a folder mlx-lm could not load: no config, no weights, corrupt weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no config.json, so not an MLX / Hugging Face model folder"
        )
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
        hint = f" (found {', '.join(others)}; mlx-lm reads model*.safetensors)" if others else ""
        raise FileNotFoundError(f"{folder}: no model*.safetensors weights{hint}")
    for file in weights:
        check_safetensors(file)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters to `dtype` (lazily: on their next evaluation), except in quantized
    layers (weights and scales) and those the model's `cast_predicate` keeps, as mlx_lm convert
    does."""
    quantized = {name for name, m in model.named_modules() if hasattr(m, "bits")}
    cast = getattr(model, "cast_predicate", lambda _: True)
    updates = [
        (name, p.astype(dtype))
        for name, p in tree_flatten(model.parameters())
        if mx.issubdtype(p.dtype, mx.floating)
        and p.dtype != dtype
        and cast(name)
        and name.rpartition(".")[0] not in quantized
    ]
    if updates:
        model.load_weights(updates, strict=False)
