"""`lazyllm-mlx convert`: mlx_lm convert's flags, GGUF sources, plus --schedule and --overwrite.

--upload-repo is refused: the folder is published with mlx-lm's own `mlx_lm.upload`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from ..config import LazyConfig
from ..convert import DTYPES, QuantizationWarning, convert
from ..quantization_check import THRESHOLD
from .common import MODEL_HELP, add_model_argument, output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mlx_lm.convert import QUANT_RECIPES

    add_model_argument(parser, "--hf-path", "--model", help=f"Source: {MODEL_HELP}")
    parser.add_argument(
        "--mlx-path", type=output_folder, default="mlx_model", help="Folder to write the model to"
    )
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights")
    quantization.add_argument(
        "-d", "--dequantize", action="store_true", help="Dequantize a quantized model"
    )
    parser.add_argument("--q-group-size", type=int, default=None, help="Quantization group size")
    parser.add_argument("--q-bits", type=int, default=None, help="Bits per quantized weight")
    parser.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    parser.add_argument(
        "--quant-predicate",
        choices=QUANT_RECIPES,
        default=None,
        help="Mixed-bit quantization recipe",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the saved floating weights (default: the source's; float16 for GGUF)",
    )
    parser.add_argument(
        "--schedule",
        default=None,
        help="LazyLLM schedule stored in config.json and used by `generate` for this model: a "
        "preset (none, paper, default, safe) or 'boundary:keep,...[;min=N][;norevive]'",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace --mlx-path if it already exists"
    )
    parser.add_argument(
        "--no-quality-check",
        action="store_true",
        help="With -q, skip measuring the quantized model's perplexity against the source's on a "
        f"built-in text (it warns beyond +{THRESHOLD:.0%}% and suggests a setting that does not; "
        "it holds the source's weights in memory at once)",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag, commit)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--upload-repo",
        default=None,
        help="Not supported: upload the folder with mlx_lm.upload (it needs the Hugging Face hub)",
    )


def check_upload(args: argparse.Namespace) -> None:
    """Refuse mlx_lm convert's --upload-repo, saying how to publish the folder instead."""
    if args.upload_repo is not None:
        raise ValueError(
            "--upload-repo is not supported: convert only writes --mlx-path (try it with "
            "`lazyllm-mlx generate` first); publish it with `mlx_lm.upload --path "
            f"{args.mlx_path} --upload-repo {args.upload_repo}`, which needs the Hugging Face hub."
        )


def run(args: argparse.Namespace) -> int:
    check_upload(args)
    schedule = LazyConfig.parse(args.schedule) if args.schedule is not None else None

    def say(message: str) -> None:
        print(f"lazyllm-mlx convert: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QuantizationWarning)
            path = _convert(args, schedule, say)
    except FileExistsError as error:
        raise ValueError(str(error)) from None  # the CLI reports ValueErrors as one-line errors
    for warning in caught:
        if issubclass(warning.category, QuantizationWarning):
            say(f"warning: {warning.message}")
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    stored = ""
    if schedule is not None:  # as it applies to this model: a preset becomes its calibration
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        stored = f", schedule {LazyConfig.from_dict(config['lazyllm']).to_string()}"
    print(f"Saved {path} ({size / 1e6:.1f} MB of weights{stored})")
    return 0


def _convert(
    args: argparse.Namespace, schedule: LazyConfig | None, say: Callable[[str], None]
) -> Path:
    return convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_group_size=args.q_group_size,
        q_bits=args.q_bits,
        q_mode=args.q_mode,
        quant_predicate=args.quant_predicate,
        dtype=args.dtype,
        schedule=schedule,
        overwrite=args.overwrite,
        dequantize=args.dequantize,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        quality_check=not args.no_quality_check,
        report=say,
    )
