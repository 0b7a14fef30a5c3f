"""Speed measurements: baseline vs lazy schedules on real-text prompts, in one process.

Runs are interleaved (baseline, schedule 1, schedule 2, … then again) so that a noisy machine
disturbs every column alike; each cell is the median over the runs after one warm-up round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.nn as nn

from ..config import LazyConfig
from ..generate import for_model
from .measure import generate_once
from .sources import real_text_tokens

# Decode speed and the whole request are also reported over the first this many tokens: a short
# answer's wait, where revival's deferred work weighs most.
SHORT_ANSWER = 16


@dataclass
class Run:
    ttft: float
    total_time: float  # seconds from the call to the last generated token
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    prefill_fraction: float | None
    prefill_tokens_per_layer: list[int] | None
    token_times: list[float] = field(default_factory=list)  # seconds from the call, per token

    @property
    def short_total(self) -> float:
        """Seconds from the call to the SHORT_ANSWER-th token (or the last one)."""
        return self.token_times[min(SHORT_ANSWER, len(self.token_times)) - 1]

    @property
    def short_decode_tps(self) -> float:
        """Tokens/s after the first one, over the next SHORT_ANSWER tokens (or as many)."""
        n = min(SHORT_ANSWER, len(self.token_times) - 1)
        return n / max(self.token_times[n] - self.token_times[0], 1e-9) if n else 0.0


@dataclass
class Cell:
    """One (prompt length, method) of the table: medians over the runs."""

    length: int
    method: str  # "baseline" or a schedule string
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)

    def summary(self, baseline: Cell | None) -> dict[str, Any]:
        out = dict(
            length=self.length,
            method=self.method,
            runs=len(self.runs),
            ttft=self.median("ttft"),
            total_time=self.median("total_time"),
            prompt_tps=self.median("prompt_tps"),
            generation_tps=self.median("generation_tps"),
            generated_tokens=len(self.runs[0].token_times),
            short_decode_tps=self.median("short_decode_tps"),
            short_total_time=self.median("short_total"),
            peak_memory_gb=self.median("peak_memory_gb"),
            prefill_fraction=self.runs[0].prefill_fraction,
        )
        if baseline is not None:
            out["speedup"] = baseline.median("ttft") / out["ttft"]
            out["total_speedup"] = baseline.median("total_time") / out["total_time"]
            out["short_total_speedup"] = baseline.median("short_total") / out["short_total_time"]
            out["decode_vs_baseline"] = out["generation_tps"] / baseline.median("generation_tps")
            out["short_decode_vs_baseline"] = out["short_decode_tps"] / baseline.median(
                "short_decode_tps"
            )
            out["memory_vs_baseline"] = out["peak_memory_gb"] / baseline.median("peak_memory_gb")
        if self.runs[0].prefill_fraction:
            out["ideal_speedup"] = 1.0 / self.runs[0].prefill_fraction
            if "speedup" in out:
                out["measured_over_ideal"] = out["speedup"] / out["ideal_speedup"]
        out["tokens_per_layer"] = self.runs[0].prefill_tokens_per_layer
        return out


def measure(
    model: nn.Module,
    tokenizer,
    tokens: list[int],
    lazy: LazyConfig | None,
    max_tokens: int,
    prefill_step_size: int,
) -> Run:
    run = generate_once(
        model, tokenizer, tokens, lazy, max_tokens=max_tokens, prefill_step_size=prefill_step_size
    )
    record = run.record()
    kept = {f.name: record[f.name] for f in fields(Run) if f.name != "token_times"}
    return Run(**kept, token_times=run.token_times)


def run_bench(
    model: nn.Module,
    tokenizer,
    lengths: list[int],
    schedules: list[str],
    runs: int = 3,
    max_tokens: int = 32,
    prefill_step_size: int = 2048,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """The table's rows: for each length, the baseline then each schedule."""
    if runs < 1:
        raise ValueError("runs must be at least 1.")
    methods = {"baseline": None} | {name: for_model(name, model) for name in schedules}
    rows = []
    for length in lengths:
        tokens = real_text_tokens(tokenizer, length)
        cells = {name: Cell(length, name) for name in methods}
        for round_index in range(runs + 1):  # round 0 is the warm-up
            for name, lazy in methods.items():
                run = measure(model, tokenizer, tokens, lazy, max_tokens, prefill_step_size)
                if round_index:
                    cells[name].runs.append(run)
                log(f"{length} tokens, {name}, round {round_index}: TTFT {run.ttft:.2f} s")
        baseline = cells.pop("baseline")
        rows += [baseline.summary(None)] + [cell.summary(baseline) for cell in cells.values()]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Decode t/s over the first SHORT_ANSWER tokens and over all; the whole request (prompt +
    SHORT_ANSWER tokens, prompt + all) against the baseline's."""
    n = SHORT_ANSWER
    header = (
        f"{'tokens':>7} {'method':<30}{'TTFT s':>8}{'×base':>7}{'ideal':>7}{'meas/ideal':>11}"
        f"{'prefill':>8}{f'dec{n} t/s':>11}{'×base':>7}{'dec t/s':>9}{'×base':>7}"
        f"{f'+{n} ×':>7}{'+all ×':>8}{'peak GB':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:

        def cell(key, fmt, width, row=row):
            value = row.get(key)
            return f"{'' if value is None else format(value, fmt):>{width}}"

        lines.append(
            f"{row['length']:>7} {row['method'][:29]:<30}{cell('ttft', '.2f', 8)}"
            f"{cell('speedup', '.2f', 7)}{cell('ideal_speedup', '.2f', 7)}"
            f"{cell('measured_over_ideal', '.2f', 11)}{cell('prefill_fraction', '.3f', 8)}"
            f"{cell('short_decode_tps', '.1f', 11)}{cell('short_decode_vs_baseline', '.2f', 7)}"
            f"{cell('generation_tps', '.1f', 9)}{cell('decode_vs_baseline', '.2f', 7)}"
            f"{cell('short_total_speedup', '.2f', 7)}{cell('total_speedup', '.2f', 8)}"
            f"{cell('peak_memory_gb', '.3f', 9)}"
        )
    return "\n".join(lines)
