"""LazyConfig: where the layers are split into stages and how many tokens each boundary keeps."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Boundaries below 1.0 are fractions of the model's depth (model-independent presets); integers
# are absolute layer indices. Each boundary b starts a stage at layer b.
# The ranking rule of every calibrated schedule and of the generic presets: the attention of the
# last 64 prompt tokens, pooled over 13 positions, heads reduced by max, 4 sink tokens kept.
WINDOW_RULE: dict[str, Any] = dict(window=64, pool=13, heads="max", sink=4)
WINDOW_RULE_TEXT = "w=64;pool=13;heads=max;sink=4"  # the same, as schedule options
_GENERIC: dict[str, Any] = dict(
    boundaries=(0.5, 0.75), revive_margin=0.5, min_prompt_tokens=256, **WINDOW_RULE
)
PRESETS: dict[str, dict[str, Any]] = {
    "none": dict(boundaries=(), keep=()),
    # The paper's figure: four stages of 30/30/30/10 % of the layers, 70 % kept at each boundary.
    "paper": dict(boundaries=(0.3, 0.6, 0.9), keep=(0.7, 0.7, 0.7)),
    # The generic layout, for models with no calibration (BENCHMARKS.md, "Calibration"): a first
    # cut at half the depth, after the layers where models from 135M to 8B retrieve, that keeps a
    # budget of tokens (so the kept share falls as prompts grow), a second at three quarters
    # keeping half. Short prompts are left alone: pruning cannot pay for itself there.
    "default": dict(_GENERIC, keep=(1024, 0.5)),
    "safe": dict(_GENERIC, keep=(2048, 0.5)),  # twice the budget
}
# Prunes harder where a model has a calibration of it; elsewhere, with nothing measured to prune
# harder safely, the same as `default`.
PRESETS["fast"] = dict(PRESETS["default"])


@dataclass(frozen=True)
class Schedule:
    """A LazyConfig resolved for one model: absolute boundary layers, what each keeps (fractions
    of the tokens present, or token budgets above 1), and the tokens every boundary keeps: the
    first `sink` ones and the last `recent` ones (at least the observation window)."""

    num_layers: int
    boundaries: tuple[int, ...]
    keep: tuple[float, ...]
    sink: int = 0
    recent: int = 1

    @property
    def stages(self) -> list[range]:
        edges = (0, *self.boundaries, self.num_layers)
        return [range(a, b) for a, b in zip(edges[:-1], edges[1:])]

    def present_counts(self, num_tokens: int) -> list[int]:
        """Tokens computed in each stage of a fresh prefill of `num_tokens` tokens."""
        counts = [num_tokens]
        forced = self.forced_count(num_tokens)
        for keep in self.keep:
            counts.append(boundary_count(counts[-1], keep, forced))
        return counts

    def forced_count(self, num_tokens: int) -> int:
        """How many of a `num_tokens` sequence's tokens every boundary keeps (sinks, recent)."""
        return min(num_tokens, self.sink + self.recent)

    def prefill_fraction(self, num_tokens: int) -> float:
        """Prompt token-layers a fresh prefill computes, over num_tokens × num_layers."""
        work = sum(n * len(s) for n, s in zip(self.present_counts(num_tokens), self.stages))
        return work / (num_tokens * self.num_layers)


def kept_count(present: int, keep: float) -> int:
    """Tokens kept out of `present` at a boundary: ceil(keep × present), at least the last token;
    a keep above 1 is a budget in tokens."""
    if keep > 1:
        return min(present, int(keep))
    return min(present, max(1, math.ceil(round(keep * present, 6))))


def boundary_count(present: int, keep: float, forced: int) -> int:
    """Tokens a boundary selects: what `keep` asks, or more when more must always be kept."""
    return max(kept_count(present, keep), min(present, forced))


@dataclass(frozen=True)
class LazyConfig:
    """A LazyLLM pruning schedule.

    boundaries: layers where a new stage starts, increasing; floats in (0, 1) are fractions of the
        model's depth, integers are layer indices.
    keep: what goes on past each boundary: a fraction in (0, 1] of the tokens present before it,
        or a budget in tokens (an integer above 1).
    revive: decode with revival (selection from layer 0 for every new token, pruned tokens resume
        from the aux cache); False attends to whatever KV each layer holds, which decodes faster.
    revive_top: with revival, a pruned token the selection wants back is revived only if it ranks
        in the top `revive_top` fraction of the boundary's selection; the others stay pruned for
        that step (1.0: LazyLLM's rule, every selected token). Fewer revivals, cheaper decoding.
    revive_margin: with revival, tokens that already have KV at a stage rank with their score
        multiplied by 1 + revive_margin, so a pruned token displaces one only when it scores that
        much higher (0: LazyLLM's rule). The selection then churns less between decode steps at
        its margin, where every token that comes in must be computed.
    revive_cap: with revival, at most this many pruned tokens come back at a boundary in one
        decode step, the best-scoring first; the others stay pruned for that step and can come
        back in a later one (None: no cap, LazyLLM's rule). Spreads deferred work over steps;
        prefill chunks are not capped.
    reselect_every: with revival, decode steps select afresh only every this many steps; in
        between, each boundary keeps its last selection plus the new tokens: no scoring, no
        revival, no host sync (1: every step, LazyLLM's rule). Revivals wait up to N - 1 steps.
    min_prompt_tokens: contexts shorter than this are not pruned at all (pruning would not pay).
    selection: "attention" (ranked by attention) or "random" (a reference method for evaluations:
        the same counts, tokens drawn at random).

    How attention ranks the tokens (the paper's rule: window 1, pool 1, heads "mean", no sinks):
    window: the last `window` tokens' queries observe (W = 1: the last token's row), each
        attending causally; their attention probabilities are averaged.
    pool: scores averaged over `pool` neighbouring positions (odd; 1: none), so spans survive whole.
    heads: how the query heads' scores combine: "mean" or "max".
    sink / recent: the first `sink` and last `recent` tokens are always kept (the last `window`
        tokens and the last token always are).
    """

    boundaries: tuple[float, ...] = ()
    keep: tuple[float, ...] = ()
    revive: bool = True
    revive_top: float = 1.0
    revive_margin: float = 0.0
    revive_cap: int | None = None
    reselect_every: int = 1
    min_prompt_tokens: int = 0
    selection: str = "attention"
    window: int = 1
    pool: int = 1
    heads: str = "mean"
    sink: int = 0
    recent: int = 0
    name: str | None = field(default=None, compare=False)
    # The preset the schedule was parsed from and the options given after it: a model with its
    # own calibration of that preset runs the calibration instead (see `calibrated`).
    from_preset: str | None = field(default=None, compare=False, repr=False)
    preset_options: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # Where a preset's schedule for this model came from (calibration.resolve_preset).
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_types(self)  # a JSON `lazy` object reaches here unparsed: its types first
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        object.__setattr__(self, "keep", tuple(float(k) for k in self.keep))
        self.validate()

    @classmethod
    def preset(cls, name: str) -> LazyConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown LazyLLM preset {name!r}; presets: {', '.join(PRESETS)}.")
        return cls(**PRESETS[name], name=name, from_preset=name)

    @classmethod
    def parse(cls, text: str) -> LazyConfig:
        """A preset name or `boundary:keep,...`, then options separated by `;`.

        Options: `min=N`, `norevive`, `revive=F` (revive_top), `margin=F` (revive_margin),
        `cap=N` (revive_cap), `every=N` (reselect_every),
        `random`, and the ranking rule's
        `w=N` (observation window), `pool=N`, `heads=mean|max`, `sink=N`, `recent=N`. Examples:
        `paper`,
        `0.3:0.7,0.6:0.7,0.9:0.7` (fractions of the depth), `9:0.7,18:0.5;min=512` (layer
        indices), `0.25:1024;w=16;pool=7` (a budget of 1024 tokens), `paper;norevive`.
        """
        if not text.strip():  # a forgotten value, not "none"
            raise ValueError("The schedule is empty: give a preset, 'none' or 'boundary:keep,...'.")
        head, *options = [part.strip() for part in text.strip().split(";")]
        if head in PRESETS:
            kwargs: dict[str, Any] = dict(PRESETS[head], name=head, from_preset=head)
            kwargs["preset_options"] = tuple(options)
        else:
            kwargs = dict(zip(("boundaries", "keep"), _parse_pairs(head, text)))
        for option in options:
            key, sep, value = option.partition("=")
            if option == "norevive":
                kwargs["revive"] = False
            elif option == "random":
                kwargs["selection"] = "random"
            elif sep and key == "heads":
                kwargs["heads"] = value.strip()
            elif sep and key == "revive":
                kwargs["revive_top"] = _parse_number(value, text)
            elif sep and key == "margin":
                kwargs["revive_margin"] = _parse_number(value, text)
            elif sep and key in _INT_OPTIONS:
                kwargs[_INT_OPTIONS[key]] = _parse_int(value, option, text)
            else:
                raise ValueError(f"Unknown schedule option {option!r} in {text!r}.")
        if options:
            kwargs.pop("name", None)
        return cls(**kwargs)

    def to_string(self) -> str:
        items = ",".join(f"{b:g}:{k:g}" for b, k in zip(self.boundaries, self.keep))
        defaults = LazyConfig()
        for key, attr in _INT_OPTIONS.items():
            if getattr(self, attr) != getattr(defaults, attr):
                items += f";{key}={getattr(self, attr)}"
        if self.heads != defaults.heads:
            items += f";heads={self.heads}"
        if self.revive_top != defaults.revive_top:
            items += f";revive={self.revive_top:g}"
        if self.revive_margin != defaults.revive_margin:
            items += f";margin={self.revive_margin:g}"
        if not self.revive:
            items += ";norevive"
        if self.selection != "attention":
            items += f";{self.selection}"
        return items if items and not items.startswith(";") else "none" + items

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # a stored schedule is explicit: it stays as stored
        del d["from_preset"], d["preset_options"], d["source"]
        d["boundaries"], d["keep"] = list(self.boundaries), list(self.keep)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LazyConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown LazyConfig fields: {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        if len(self.boundaries) != len(self.keep):
            raise ValueError(
                f"Schedule has {len(self.boundaries)} boundaries but {len(self.keep)} keep values."
            )
        for k in self.keep:
            if not math.isfinite(k) or k <= 0.0 or (k > 1.0 and (k != int(k) or k > MAX_BUDGET)):
                raise ValueError(
                    f"Keep {k:g} is out of range: a fraction in (0, 1] or a whole number of "
                    f"tokens from 2 to {MAX_BUDGET}."
                )
        kinds = {_boundary_kind(b) for b in self.boundaries}
        if len(kinds) > 1:
            raise ValueError(
                f"Boundaries {self.boundaries} mix depth fractions and layer indices; use one kind."
            )
        if any(b2 <= b1 for b1, b2 in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"Boundaries {self.boundaries} must be strictly increasing.")
        if self.min_prompt_tokens < 0:
            raise ValueError("min_prompt_tokens must be >= 0.")
        if self.selection not in ("attention", "random"):
            raise ValueError(f"selection must be 'attention' or 'random', not {self.selection!r}.")
        if self.window < 1:
            raise ValueError(f"The observation window must be at least 1 token, not {self.window}.")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd number of positions (1: none), not {self.pool}.")
        if self.heads not in ("mean", "max"):
            raise ValueError(f"heads must be 'mean' or 'max', not {self.heads!r}.")
        if not 0.0 < self.revive_top <= 1.0:
            raise ValueError(
                f"revive must be a fraction in (0, 1] of a boundary's selection, not "
                f"{self.revive_top:g}."
            )
        if not 0.0 <= self.revive_margin < math.inf:
            raise ValueError(f"margin must be a number >= 0, not {self.revive_margin:g}.")
        if self.revive_cap is not None and self.revive_cap < 0:
            raise ValueError(f"cap must be a whole number of tokens >= 0, not {self.revive_cap}.")
        if self.reselect_every < 1:
            raise ValueError(
                f"every must be a whole number of steps >= 1, not {self.reselect_every}."
            )
        if self.sink < 0 or self.recent < 0:
            raise ValueError("sink and recent must be >= 0 tokens.")

    def resolve(self, num_layers: int) -> Schedule:
        """Absolute boundaries for a model with `num_layers` layers; boundaries keeping every token
        (keep 1.0) dropped."""
        layers = [b if isinstance(b, int) else round(b * num_layers) for b in self.boundaries]
        for given, layer in zip(self.boundaries, layers):
            if not 1 <= layer < num_layers:
                raise ValueError(
                    f"Boundary {given} gives layer {layer}, outside 1..{num_layers - 1} for a "
                    f"model with {num_layers} layers."
                )
        if any(b2 <= b1 for b1, b2 in zip(layers, layers[1:])):
            raise ValueError(
                f"Boundaries {self.boundaries} collapse to layers {layers} on a {num_layers}-layer "
                "model: the model has too few layers for this schedule."
            )
        pairs = [(b, k) for b, k in zip(layers, self.keep) if k != 1.0]
        return Schedule(
            num_layers=num_layers,
            boundaries=tuple(b for b, _ in pairs),
            keep=tuple(k for _, k in pairs),
            sink=self.sink,
            recent=max(1, self.window, self.recent),
        )


MAX_BUDGET = 1 << 24  # tokens: above any model's context, below float precision trouble


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(config: LazyConfig) -> None:
    """ValueError (one line) for a field of the wrong type: a float window, a string keep, a
    number for `revive`, as a JSON object can hold them."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in ("boundaries", "keep"):
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise ValueError(f"{f.name} must be a list of numbers, not {value!r}.")
        elif f.name in _INT_FIELDS:
            if not (isinstance(value, int) and not isinstance(value, bool)):
                if not (value is None and f.name == "revive_cap"):
                    raise ValueError(f"{f.name} must be a whole number, not {value!r}.")
        elif f.name in ("revive_top", "revive_margin") and not _is_number(value):
            raise ValueError(f"{f.name} must be a number, not {value!r}.")
        elif f.name == "revive" and not isinstance(value, bool):
            raise ValueError(f"revive must be true or false, not {value!r}.")


def _boundary_kind(b: float) -> str:
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise ValueError(f"Boundary {b!r} must be a layer index (int) or a depth fraction.")
    if isinstance(b, int):
        return "layer"
    if not 0.0 < b < 1.0:
        raise ValueError(
            f"Boundary {b} must be a depth fraction in (0, 1) or an integer layer index."
        )
    return "fraction"


def _parse_pairs(head: str, text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    boundaries, keep = [], []
    for item in filter(None, (p.strip() for p in head.split(","))):
        b, sep, k = item.partition(":")
        if not sep:
            raise ValueError(
                f"Bad schedule item {item!r} in {text!r}: expected boundary:keep "
                f"(e.g. 0.3:0.7 or 9:0.7) or a preset ({', '.join(PRESETS)})."
            )
        boundaries.append(_parse_boundary(b, text))
        keep.append(_parse_number(k, text))
    return tuple(boundaries), tuple(keep)


# Integer schedule options: their name in schedule strings -> LazyConfig field.
_INT_OPTIONS: dict[str, str] = {
    "min": "min_prompt_tokens",
    "w": "window",
    "pool": "pool",
    "sink": "sink",
    "recent": "recent",
    "cap": "revive_cap",
    "every": "reselect_every",
}
_INT_FIELDS = set(_INT_OPTIONS.values())


def _parse_int(s: str, option: str, text: str) -> int:
    try:
        if not s.strip().isascii():  # int() takes full-width and other Unicode digits
            raise ValueError
        return int(s.strip())
    except ValueError:
        raise ValueError(
            f"Bad option {option!r} in schedule {text!r}: expected a whole number."
        ) from None


def _parse_number(s: str, text: str) -> float:
    try:
        if not s.strip().isascii():  # float() takes full-width and other Unicode digits
            raise ValueError
        return float(s)
    except ValueError:
        raise ValueError(f"Bad number {s!r} in schedule {text!r}.") from None


def _parse_boundary(s: str, text: str) -> float:
    s = s.strip()
    if s.isascii() and s.isdigit():
        return int(s)
    return _parse_number(s, text)


def split_schedules(items: list[str]) -> list[str]:
    """Each argument is a comma list of presets (`paper,default;norevive`) or one schedule
    string, whose own commas separate boundaries (`0.5:0.8,0.75:0.7`)."""
    schedules: list[str] = []
    for item in items:
        parts = [p.strip() for p in item.split(",") if p.strip()]
        presets = [p.split(";")[0].strip() in PRESETS for p in parts]
        if all(presets):
            schedules += parts
        elif any(presets):
            raise ValueError(
                f"{item!r} mixes presets and boundary:keep pairs; give each schedule as its own "
                "argument, e.g. --schedules paper,default '0.5:0.8,0.75:0.7'."
            )
        else:
            schedules.append(item.strip())
    return list(dict.fromkeys(schedules))


def as_config(lazy: LazyConfig | str | dict | None) -> LazyConfig | None:
    """Accept a LazyConfig, a preset name or schedule string, a dict, or None (no LazyLLM)."""
    if lazy is None or isinstance(lazy, LazyConfig):
        return lazy
    if isinstance(lazy, str):
        return LazyConfig.parse(lazy)
    if isinstance(lazy, dict):
        return LazyConfig.from_dict(lazy)
    raise TypeError(f"lazy must be a LazyConfig, a preset name, a dict or None, not {type(lazy)}")
