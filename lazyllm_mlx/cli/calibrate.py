"""`lazyllm-mlx calibrate`: measure a model's schedules once; every later load finds them
(see lazyllm_mlx/calibrate.py for the method and lazyllm_mlx/calibration_store.py for where)."""

from __future__ import annotations

import argparse
import sys

from ..calibrate import SIZES, CalibrateOptions, calibrate
from ..calibration_store import store_dir
from ..families import check_supported, family_of, model_type_of
from ..loading import load
from ..output_files import write_json
from .common import (
    add_model_argument,
    command_line,
    model_label,
    non_negative_int,
    output_file,
    positive_int,
    unit_float,
)

_DEFAULTS = CalibrateOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--length", type=positive_int, default=_DEFAULTS.length,
        help=f"Prompt length the probe and verification use (default: {_DEFAULTS.length})",
    )  # fmt: skip
    parser.add_argument(
        "--probe-prompts", type=positive_int, default=_DEFAULTS.probe_prompts,
        help=f"Needle prompts per probe task, 3 tasks (default: {_DEFAULTS.probe_prompts})",
    )  # fmt: skip
    parser.add_argument(
        "--verify-prompts", type=positive_int, default=_DEFAULTS.verify_prompts,
        help="Prompts per eval task, 4 tasks, to verify the choice on "
        f"(default: {_DEFAULTS.verify_prompts})",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=unit_float, default=_DEFAULTS.target,
        help=f"Share of the answer tokens every cut must keep (default: {_DEFAULTS.target})",
    )  # fmt: skip
    parser.add_argument(
        "--decode-rounds", type=non_negative_int, default=_DEFAULTS.decode_rounds, metavar="N",
        help="Timed rounds deciding whether selecting every few decode steps (every=) is faster "
        f"here; 0: not timed (default: {_DEFAULTS.decode_rounds})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="Seed of the prompts")
    parser.add_argument(
        "--json", type=output_file, metavar="PATH", help="Also write the calibration here"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Measure and print, but store nothing"
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bar")


def run(args: argparse.Namespace) -> int:
    if args.length < 256:
        raise ValueError("--length must be at least 256 tokens: shorter prompts are not pruned.")
    model, tokenizer = load(args.model)
    check_supported(model_type_of(model))  # before any measurement
    options = CalibrateOptions(length=args.length, probe_prompts=args.probe_prompts,
                               verify_prompts=args.verify_prompts, target=args.target,
                               seed=args.seed, decode_rounds=args.decode_rounds)  # fmt: skip
    label = model_label(args.model)
    print(f"calibrating {label} at {args.length} tokens: {3 * args.probe_prompts} probe prompts, "
          f"then {4 * args.verify_prompts} verification prompts per candidate, then "
          f"{args.decode_rounds} rounds of decode timing")  # fmt: skip
    with _bar(args.quiet, 3 * args.probe_prompts, 8 * args.verify_prompts) as bar:
        calibration = calibrate(
            model, tokenizer, options, label=label, command=command_line(args, "calibrate"),
            progress=bar.tick, say=bar.say, save=not args.dry_run,
        )  # fmt: skip
    num_layers = family_of(model).num_layers
    for name, text in calibration.schedules.items():
        fractions = calibration.evidence["expected_prefill_fraction"][name]
        expected = ", ".join(f"{fractions[n]:.0%} at {n // 1024}K" for n in SIZES)
        print(f"{name}: {text}\n    prefill fraction {expected} ({num_layers} layers)")
    print(f"measured in {calibration.evidence['seconds'] / 60:.1f} min")
    if args.json:
        write_json(args.json, calibration.to_dict())
    if args.dry_run:
        print("dry run: nothing stored")
    else:
        print(f"stored in {calibration.origin}; `default`, `fast` and `safe` use it for this model "
              f"from now on (store: {store_dir()})")  # fmt: skip
    return 0


class _bar:
    """A tqdm bar on stderr that grows when a back-off adds a verification round."""

    def __init__(self, quiet: bool, probing: int, verifying: int) -> None:
        from tqdm import tqdm

        self.round = verifying  # runs per verification round: baseline and lazy per prompt
        total = probing + verifying
        self.bar = tqdm(total=total, desc="calibrate", unit="run", disable=quiet, file=sys.stderr)

    def __enter__(self) -> _bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def tick(self, _: str) -> None:
        if self.bar.n >= self.bar.total:
            self.bar.total += self.round
        self.bar.update()

    def say(self, message: str) -> None:
        self.bar.write(message, file=sys.stdout)
        sys.stdout.flush()  # a decision shows when it is made, also when stdout is a file
