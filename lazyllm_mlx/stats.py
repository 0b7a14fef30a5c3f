"""The counters of one lazy request, which stats, benchmarks and the invariant tests read, and
the one mapping from them to the fields of a report (CLI, bench, eval, server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LazyStats:
    """Counters of one request (prefill + decode), for stats and for the invariant tests."""

    num_layers: int
    prompt_tokens: int = 0
    prefill_token_layers: int = 0  # this request's prompt tokens, computed during its prefill
    revival_token_layers: int = 0  # older tokens revived while prefilling a later turn
    decode_token_layers: int = 0
    decode_steps: int = 0
    revived: int = 0  # tokens resumed from an aux cache
    pruned: bool = False  # whether this request pruned anything
    prefill_tokens_per_layer: list[int] = field(default_factory=list)
    aux_bytes: int = 0

    @property
    def prefill_fraction(self) -> float:
        """Prompt token-layers computed in prefill / (prompt tokens × layers)."""
        return self.prefill_token_layers / max(1, self.prompt_tokens * self.num_layers)

    @property
    def ideal_prefill_speedup(self) -> float:
        return 1.0 / self.prefill_fraction if self.prefill_token_layers else 1.0


def lazy_fields(stats: LazyStats | None) -> dict[str, Any]:
    """A request's LazyLLM figures by the names every report gives them; each None when no lazy
    engine ran (the baseline). A report keeps the ones it shows."""
    if stats is None:
        return dict.fromkeys(_FIELDS)
    return {name: getattr(stats, name) for name in _FIELDS}


_FIELDS = ("prefill_fraction", "revived", "pruned", "aux_bytes", "prefill_tokens_per_layer")
