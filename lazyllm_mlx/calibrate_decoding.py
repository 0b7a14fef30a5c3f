"""`calibrate`'s last step: whether the chosen schedule should select afresh at every decode step
or only every few (`every=`), decided by timing both on this machine.

Selecting at a decode step costs each boundary a scoring pass and a host sync; between
reselections a boundary keeps its last selection plus the new token. Whether that saving shows
depends on the model and the machine (SmolLM2 decoded 0.9x the baseline without it and 1.04x
with it at 4K on our CPU; Qwen2.5-1.5B no faster: BENCHMARKS.md, "Decoding"), so it is measured:
the baseline, the schedule and the schedule with `every=` decode SHORT_ANSWER tokens after the
same prompt, interleaved, and `every=` is kept only when it is clearly faster and still holds
the baseline's answers on the verification prompts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .config import LazyConfig
from .evals.bench import SHORT_ANSWER, measure
from .evals.measure import warm_up
from .evals.sources import real_text_tokens

EVERY = 4  # the reselection interval tried (the shipped SmolLM2 calibration's)
PREFILL_STEP = 2048  # mlx-lm's default prefill step size
FASTER = 1.05  # decode speed ratio `every=` must reach: below it, timing noise, not a saving


def decode_speeds(
    model: Any,
    tokenizer: Any,
    methods: dict[str, LazyConfig | None],
    length: int,
    rounds: int,
    tick: Callable[[str], None],
) -> dict[str, float]:
    """Median tokens/s over the SHORT_ANSWER tokens after the first, per method (None: the
    baseline), each run after the same `length`-token prompt, rounds interleaved."""
    tokens = real_text_tokens(tokenizer, length)
    warm_up(model, tokenizer, tokens, methods.values())
    speeds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, lazy in methods.items():
            run = measure(model, tokenizer, tokens, lazy, SHORT_ANSWER + 1, PREFILL_STEP)
            speeds[name].append(run.short_decode_tps)
            tick(f"decode timing: {name}")
    return {name: statistics.median(values) for name, values in speeds.items()}


def with_every(text: str, every: int) -> str:
    """`text` selecting afresh every `every` decode steps (its other options as written)."""
    layout, _, options = text.partition(";")
    return f"{layout};every={every}" + (f";{options}" if options else "")


def choose_every(
    model: Any,
    tokenizer: Any,
    text: str,
    length: int,
    rounds: int,
    holds: Callable[[str], dict[str, Any]],
    tick: Callable[[str], None],
    say: Callable[[str], None],
) -> tuple[str, dict[str, Any]]:
    """`text`, or `text` with every=EVERY when that decodes FASTER and `holds` (the verification:
    returns a rung's evidence, its verdict None when it holds); and the measurements."""
    start = time.perf_counter()
    candidate = with_every(text, EVERY)
    methods = {"baseline": None, "every step": LazyConfig.parse(text),
               f"every={EVERY}": LazyConfig.parse(candidate)}  # fmt: skip
    speeds = decode_speeds(model, tokenizer, methods, length, rounds, tick)
    ratios = {name: speeds[name] / speeds["baseline"] for name in methods if name != "baseline"}
    evidence: dict[str, Any] = dict(
        tokens=SHORT_ANSWER, rounds=rounds, length=length,
        timing_seconds=round(time.perf_counter() - start, 1),
        tokens_per_second={k: round(v, 3) for k, v in speeds.items()},
        vs_baseline={k: round(v, 3) for k, v in ratios.items()},
    )  # fmt: skip
    gain = ratios[f"every={EVERY}"] / ratios["every step"]
    line = (f"decoding, {SHORT_ANSWER} tokens against the baseline's: "
            f"{ratios['every step']:.2f}x selecting at every step, {ratios[f'every={EVERY}']:.2f}x "
            f"with every={EVERY}")  # fmt: skip
    if gain < FASTER:
        say(f"{line}: no clear gain, selecting at every step")
        return text, evidence | dict(chosen=text)
    rung = holds(candidate)
    evidence["verified"] = rung
    if rung["verdict"] is not None:
        say(f"{line}: faster, but with every={EVERY} it {rung['verdict']}")
        return text, evidence | dict(chosen=text)
    say(f"{line}: kept, answers hold")
    return candidate, evidence | dict(chosen=candidate)
