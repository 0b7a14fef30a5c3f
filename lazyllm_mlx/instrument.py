"""A hook on the engine for profiling tools and tests: it sees every call, boundary and stage.

The engine hands each part to the active Instrument as a function to run; the default runs it
and adds nothing. A profiler evaluates around the part to time it (which changes how host and
device overlap, so timings of parts add up to more than a real step); a test counts or records
what it sees. Activate one for a block:

    with instrumented(MyInstrument()):
        list(generate_step(prompt, model, lazy="paper"))

One instrument is active at a time, for every thread: a tool's, never the hot path's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from .cache import LazyCache
from .flight import Attend, InFlight, StageResult
from .stage_plan import StagePlan

T = TypeVar("T")


class Instrument:
    """Override what you need; each method must call `run` once and return what it returns."""

    def call(self, kind: str, cache: LazyCache, tokens: int, run: Callable[[], T]) -> T:
        """One engine call: kind "prefill" or "decode", `tokens` new tokens at cache.offset."""
        return run()

    def boundary(
        self, k: int, ranked: StageResult, run: Callable[[], tuple[InFlight, Attend]]
    ) -> tuple[InFlight, Attend]:
        """Boundary k's selection among what the previous stage ranked; returns the tokens
        stage k computes and what they attend to."""
        return run()

    def stage(
        self, plan: StagePlan, flight: InFlight, run: Callable[[], StageResult]
    ) -> StageResult:
        """Stage plan.k computing `flight` (flight.count tokens) through its layers."""
        return run()


_NOTHING = Instrument()
_active = _NOTHING


def active() -> Instrument:
    """The instrument the engine reports to now."""
    return _active


@contextmanager
def instrumented(instrument: Instrument) -> Iterator[Instrument]:
    """Report the engine's parts to `instrument` inside the block."""
    global _active
    previous, _active = _active, instrument
    try:
        yield instrument
    finally:
        _active = previous
