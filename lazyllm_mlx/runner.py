"""What the engine runs: a model's family with one resolved schedule (`Runner`), and one request's
selection state between its decode steps (`Selections`).

A Runner is made once per (model, schedule), kept with the model, and never changes; every
engine call gets it as an argument, with the cache (storage) and the request's stats and
selections. Nothing in the engine reads its policy from the cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import mlx.nn as nn

from .config import LazyConfig, Schedule
from .families import Family, family_of
from .flight import Attend
from .pruning import scoring_layer


@dataclass(frozen=True)
class Runner:
    """A model's family with one schedule: the stages' layers, the layer of each stage whose
    attention ranks tokens for the next boundary, and the options that rule selection,
    revival and decoding (config)."""

    family: Family
    config: LazyConfig
    schedule: Schedule
    scorers: tuple[int, ...]  # per stage: its scoring layer (pruning.scoring_layer)

    @property
    def selects(self) -> bool:
        """Whether the schedule has boundaries at all."""
        return bool(self.schedule.boundaries)

    def prunes(self, context: int) -> bool:
        """Whether a call that ends with `context` tokens in the cache selects at boundaries
        (config.min_prompt_tokens: shorter contexts gain nothing from pruning)."""
        return self.selects and context >= self.config.min_prompt_tokens


def runner_for(model: nn.Module, config: LazyConfig) -> Runner:
    """The Runner of `model` with `config` (a schedule already resolved for it, see
    generate.for_model): made on first use, then kept with the model (the last few used)."""
    with _RUNNERS_LOCK:  # a server checks requests on several threads
        runners = getattr(model, "_lazyllm_runners", None)
        if runners is None:
            runners = {}
            object.__setattr__(model, "_lazyllm_runners", runners)  # not a parameter or child
        runner = runners.pop(config, None)
        if runner is None:
            family = family_of(model)
            schedule = config.resolve(family.num_layers)  # raises for one that does not fit
            scorers = tuple(scoring_layer(layers, family.windows) for layers in schedule.stages)
            runner = Runner(family, config, schedule, scorers)
        runners[config] = runner  # the most recent last; a server's clients may name many
        while len(runners) > _KEPT_RUNNERS:
            del runners[next(iter(runners))]
        return runner


_KEPT_RUNNERS = 16
_RUNNERS_LOCK = threading.Lock()


@dataclass
class Selections:
    """One request's selection state between decode steps: whether its steps select (its
    prefill pruned and the schedule revives), each boundary's last selection (index k - 1 for
    boundary k) and the steps since they were made (config.reselect_every)."""

    selecting: bool = False
    held: list[Attend] = field(default_factory=list)
    steps_without_selection: int = 0

    def kept_by_next_step(self, runner: Runner) -> bool:
        """Whether the next decode step keeps the boundaries' last selections."""
        complete = len(self.held) == len(runner.schedule.stages) - 1
        return (
            self.selecting
            and complete
            and self.steps_without_selection < runner.config.reselect_every - 1
        )
