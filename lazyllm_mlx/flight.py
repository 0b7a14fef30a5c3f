"""What passes between a stage and the next boundary: the tokens in flight, which stored keys a
stage attends to, and what a stage hands on (its outputs and its ranking)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class InFlight:
    """Tokens computed at the current stage in this call: positions and hidden states."""

    positions: mx.array  # (n,) int32, increasing
    hidden: mx.array  # (1, n, hidden), or (n,) token ids before the first stage embeds them
    count: int
    first_position: int | None  # set when positions are contiguous (plain RoPE offset)
    new_count: int  # how many of them are this call's new tokens (the others are revived)


@dataclass
class Attend:
    """Which stored keys the tokens of a stage attend to.

    selected None: everything the store holds. Otherwise the selected positions, reached either by
    gathering their keys (many queries: fewer keys to score) or by masking the whole store (a few
    queries, as in decoding: no copies of the keys).
    """

    selected: mx.array | None = None  # positions
    count: int = 0  # how many are selected
    is_selected: mx.array | None = None  # bool per position
    gather: bool = False


@dataclass
class StageResult:
    """What a stage hands to the next boundary: its tokens' outputs and the ranking."""

    hidden: mx.array  # (1, n, hidden): the flight's outputs (the final stage: the last token's)
    scores: mx.array | None  # the observation window's scores over the candidates
    candidates: mx.array  # positions the scores rank
    n_candidates: int  # how many of them are candidates (the others are masked out)
