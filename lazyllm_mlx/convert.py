"""`convert()`: an HF/MLX folder, a hub id or a GGUF file -> an MLX folder, optionally quantized,
with a LazyLLM schedule stored in config.json under "lazyllm".

mlx-lm does the work (`mlx_lm.utils.load`, `quantize_model`, its mixed-bit recipes, `save`, which
writes the weights, `save_config` and the tokenizer files); this module adds GGUF sources, the
schedule, a progress bar, a check of what quantization does to the model (`quantization_check`:
perplexity on a built-in text, a warning with a better setting when it degrades) and a safe write:
everything goes to a temporary folder beside the target, renamed into place at the end, so a
failed conversion leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import calibration_store
from .calibration_store import Calibration
from .config import LazyConfig, as_config
from .default_model import default_model_path
from .families import check_supported, model_type_of
from .generate import for_model
from .gguf.loader import GGUF_DEFAULT_DTYPE
from .loading import cast_floating, load_source
from .output_files import NotARegularFile
from .quantization_check import check_quantization

DTYPES = ("float16", "bfloat16", "float32")  # as mlx_lm convert's --dtype


def convert(
    hf_path: str | Path | None = None,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | None = None,
    dtype: str | None = None,
    schedule: LazyConfig | str | dict | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    quality_check: bool = True,
    report: Callable[[str], None] | None = None,
    dequantize: bool = False,
) -> Path:
    """Convert `hf_path` (folder, hub id, .gguf file; None: the default model) to an MLX folder.

    Arguments follow `mlx_lm.convert`. dtype: of the saved floating weights; default the source's
    (config.json's torch_dtype, float16 for GGUF). schedule: stored in config.json, used by
    `lazyllm-mlx generate` by default; checked against the model before anything is written.
    overwrite: replace an existing `mlx_path`. dequantize: write a quantized source's weights
    in floating point (mlx-lm's -d). progress: a progress bar on stderr (default: when
    stderr is a terminal). quality_check: with `quantize`, measure the perplexity of the quantized
    weights against the source's on a short built-in text (a forward pass of each: the source's
    weights are then held in memory at once); a rise beyond quantization_check.THRESHOLD warns
    (QuantizationWarning) with a setting that would not. report: called with the measurement.
    Returns the path of the new folder.
    """
    source = default_model_path() if hf_path is None else hf_path
    if Path(mlx_path).expanduser().resolve() == Path(source).expanduser().resolve():
        raise ValueError(f"{mlx_path} is the source model: choose another output path")
    target = _output_folder(Path(mlx_path).expanduser(), overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize and dequantize:
        raise ValueError("Choose -q/--quantize or -d/--dequantize, not both.")
    if not quantize and (q_bits or q_group_size or quant_predicate):
        raise ValueError("--q-bits, --q-group-size and --quant-predicate need -q/--quantize")
    if quantize:
        check_quantization_options(q_group_size, q_bits, q_mode)
    lazy = as_config(schedule)
    show = sys.stderr.isatty() if progress is None else progress

    model, tokenizer, config, src = _load_source(source, dtype, revision, trust_remote_code, show)
    measured = calibration_store.find(model)  # the source's own calibration travels with it
    if dequantize:
        model = _dequantize(model, config, dtype)
    if lazy is not None:
        check_supported(model_type_of(model))
        lazy = for_model(lazy, model)  # a preset as it applies to this model
        lazy.resolve(len(model.layers))  # raises if the schedule does not fit this model
        config["lazyllm"] = lazy.to_dict()

    if quantize:
        predicate = _recipe(model, quant_predicate, q_mode, q_group_size)
        if quality_check:
            _check(model, tokenizer, q_group_size, q_bits, q_mode, predicate, report)
        model, config = _quantize(model, config, q_group_size, q_bits, q_mode, predicate)
    _evaluate(model, show)
    carried = _carried(measured, model) if measured is not None else None
    with _staging(target, overwrite) as folder:
        _save(folder, src, model, tokenizer, config)  # empties `model` (mlx-lm donates it)
        if carried is not None:
            calibration_store.write(carried, folder / calibration_store.MODEL_FILE)
    return target


def _dequantize(model: nn.Module, config: dict, dtype: str | None) -> nn.Module:
    """mlx_lm convert's -d: quantized layers back to floating ones, all weights in `dtype`, else
    the stored one (the dequantized ones come out in their scales' dtype)."""
    from mlx_lm.utils import dequantize_model

    config.pop("quantization", None)
    config.pop("quantization_config", None)
    model = dequantize_model(model)
    if (target := dtype or _stored_dtype(config)) is not None:
        cast_floating(model, getattr(mx, target))
    return model


def _carried(measured: Calibration, model: nn.Module) -> Calibration:
    """The source's calibration for the converted model: under its fingerprint (a quantization
    has its own), naming the one it was measured on."""
    converted = calibration_store.fingerprint(model)
    carried = replace(measured, fingerprint=converted)
    if converted != measured.fingerprint:
        carried.measured_on = measured.measured_on or measured.fingerprint
    return carried


def _load_source(source, dtype, revision, trust_remote_code, show) -> tuple[Any, Any, dict, Path]:
    """(model, tokenizer, config, local source path); floating weights in the dtype to save:
    `dtype`, else the source's (config.json's torch_dtype, float16 for GGUF)."""
    model, tokenizer, config, path = load_source(
        source,
        getattr(mx, dtype) if dtype else None,
        tokenizer_config={"trust_remote_code": trust_remote_code},
        revision=revision,
        trust_remote_code=trust_remote_code,
        lazy=True,
        progress=show,
        quantized=False,  # a GGUF source is dequantized; -q quantizes it anew
        gguf_cache=False,  # read once: keeping its float16 copy would only fill the disk
    )
    if path.is_file():  # GGUF
        config["torch_dtype"] = dtype or GGUF_DEFAULT_DTYPE
        # mlx-lm's loader gives the tokenizer its end-of-generation ids from config.json.
        config["eos_token_id"] = sorted(tokenizer.eos_token_ids)
    elif dtype is None and (stored := _stored_dtype(config)) is not None:
        cast_floating(model, getattr(mx, stored))
    return model, tokenizer, config, path


def _stored_dtype(config: dict) -> str | None:
    for d in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if d.get(key) in DTYPES:
                return d[key]
    return None


# mlx_lm.utils.quantize_model's defaults per mode: (group size, bits)
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def check_quantization_options(group_size: int | None, bits: int | None, mode: str) -> None:
    """Refuse what MLX cannot quantize, before loading anything (mlx-lm would otherwise skip
    every layer in silence and write an unquantized model)."""
    if mode not in MODE_DEFAULTS:
        raise ValueError(f"--q-mode must be one of {', '.join(MODE_DEFAULTS)}, not {mode!r}")
    default_group, default_bits = MODE_DEFAULTS[mode]
    group = default_group if group_size is None else group_size
    nbits = default_bits if bits is None else bits
    if group < 1 or nbits < 1:
        raise ValueError(f"--q-group-size {group} / --q-bits {nbits}: both must be positive")
    try:
        mx.quantize(mx.zeros((1, group * 8)), group, nbits, mode=mode)
    except ValueError as error:
        reason = str(error).removeprefix("[quantize] ")
        raise ValueError(f"--q-group-size {group} / --q-bits {nbits} ({mode}): {reason}") from None


class QuantizationWarning(UserWarning):
    """The quantized model's perplexity rose beyond quantization_check.THRESHOLD."""


def _recipe(model, recipe: str | None, mode: str, group_size: int | None):
    """mlx-lm's predicate for a mixed-bit recipe, or None."""
    if recipe is None:
        return None
    from mlx_lm.convert import mixed_quant_predicate_builder

    if mode != "affine":
        raise ValueError("Mixed-bit recipes (--quant-predicate) need the affine mode.")
    return mixed_quant_predicate_builder(recipe, model, group_size or 64)


def _check(model, tokenizer, group_size, bits, mode, predicate, report) -> None:
    default_group, default_bits = MODE_DEFAULTS[mode]
    group = default_group if group_size is None else group_size
    nbits = default_bits if bits is None else bits
    check = check_quantization(model, tokenizer, group, nbits, mode, predicate)
    if report is not None:
        report(check.summary())
    if (message := check.warning()) is not None:
        warnings.warn(message, QuantizationWarning, stacklevel=3)


def _quantize(model, config, group_size, bits, mode, predicate) -> tuple[nn.Module, dict]:
    from mlx_lm.utils import quantize_model

    model, config = quantize_model(
        model, config, group_size, bits, mode=mode, quant_predicate=predicate
    )
    if not any(hasattr(m, "bits") for _, m in model.named_modules()):
        group = group_size or MODE_DEFAULTS[mode][0]
        raise ValueError(
            f"No layer could be quantized with groups of {group}: the weights' rows are not "
            "multiples of it. Choose another --q-group-size."
        )
    return model, config


def _evaluate(model: nn.Module, show: bool) -> None:
    """Load, cast and quantize layer by layer (the graph is lazy until here), with a bar."""
    from tqdm.auto import tqdm

    layers = list(getattr(model, "layers", []))
    with tqdm(total=len(layers) + 1, desc="Converting", unit="layer", disable=not show) as bar:
        for layer in layers:
            mx.eval(layer.parameters())
            bar.update()
        mx.eval(model.parameters())
        bar.update()


def _save(folder: Path, source: Path, model, tokenizer, config: dict) -> None:
    from mlx_lm.utils import save

    # mlx-lm's writer: weights (+ index), config.json (sorted), tokenizer files, the source's
    # *.py and generation_config.json, a model card.
    save(folder, source, model, tokenizer, config)


def _output_folder(given: Path, overwrite: bool) -> Path:
    """The folder to write (a symlink followed). Only a model folder or an empty one is ever
    replaced: never a file, a device, or a folder of something else."""
    target = Path(os.path.realpath(given))
    if not target.exists():
        return target
    if not target.is_dir():
        raise NotARegularFile(f"{given} exists and is not a folder: refusing to replace it")
    if not overwrite:
        raise FileExistsError(
            f"{given} already exists; choose another path, or overwrite it (--overwrite)"
        )
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise NotARegularFile(
            f"{given} holds no config.json, so it is not a model folder: refusing to replace it"
        )
    return target


@contextmanager
def _staging(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to `target` on success, removed on failure.
    Write errors name `target`, not the temporary folder."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        )
    except OSError as error:
        raise OSError(f"cannot write {target}: {error.strerror or error}") from None
    try:
        yield folder
        _publish(folder, target, overwrite)
    except (FileExistsError, NotARegularFile):
        raise
    except (OSError, RuntimeError) as error:  # MLX's writers raise RuntimeError (a full disk)
        reason = getattr(error, "strerror", None) or error
        raise OSError(f"cannot write {target}: {reason}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _publish(folder: Path, target: Path, overwrite: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes it private
    if not target.exists() and not target.is_symlink():
        os.rename(folder, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} appeared during the conversion; not replaced")
    _output_folder(target, overwrite)  # it may have changed during the conversion
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()  # only the unique name is wanted
    os.rename(target, old)
    try:
        os.rename(folder, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)
