"""Presets calibrated on the models we measure: where a small model's attention finds what a
prompt asks for is a property of the model (`lazyllm-mlx probe`), so `default`, `fast` and `safe`
resolve to a per-model schedule where one was measured, and to config.PRESETS elsewhere."""

from __future__ import annotations

from dataclasses import replace

import mlx.nn as nn

from . import calibration_store
from .calibration_store import PRESET_NAMES
from .config import WINDOW_RULE_TEXT, LazyConfig
from .families import architecture_of

# What the `schedule:` line says of a model with no calibration: how to get one.
UNCALIBRATED = "generic layout: this model is not calibrated; `lazyllm-mlx calibrate` measures it"

# By architecture (model type, layers, hidden size, query heads, KV heads): no layout in depth
# fractions suits every small model. Fine-tunes of a model share its architecture and, mostly,
# its calibration.
# The schedules below use the window rule (an observation window of 64 queries, scores pooled over
# 13 positions, heads reduced by max, 4 sink tokens) at the layers where the model retrieves.
_WINDOW_RULE = f"{WINDOW_RULE_TEXT};min=256"
CALIBRATED: dict[tuple[str, int, int, int, int], dict[str, str]] = {
    # SmolLM2-135M: retrieval is sharp at layers 15, 17 and 18 and starts at 7 only in longer
    # prompts, so a cut at 8 loses passkeys at 1K tokens (fast: 2 of 13 lost there, +6.9 ± 6.1
    # points overall; +26.8 ± 6.0 at 2K). The default's first cut is a budget: up to 1,536 tokens
    # it keeps them all (then it is 15:0.4,19:0.5, +14.3 ± 6.3 at 1K), and past that the kept
    # share falls as prompts grow (2K: 54 % of the token-layers, +25.0 ± 7.4; 4K: 40 %, +19.2 ±
    # 5.6 on 40 prompts with the decoding options below, no passkey lost, code +3.5 ± 2.6).
    # Decoding with a revival margin of 0.5 gave the same answers as plain revival on 24 prompts at
    # 2K (22 outputs identical) and decodes faster (4K, 256 tokens: x1.05 of the baseline, not .98).
    # Selecting afresh every 4th decode step with it: -0.5 ± 0.5 points against plain revival on
    # those prompts (18 of 24 identical), and x1.26 of the baseline's decode speed over 256 tokens.
    ("llama", 30, 576, 9, 3): {
        "default": f"8:1536,15:0.4,19:0.5;margin=0.5;every=4;{_WINDOW_RULE}",
        "fast": f"8:0.4,18:0.5;{_WINDOW_RULE}",
    },
    # Gemma 3 270M: its first global-attention layer (5) retrieves; one cut right after it, at 2K
    # tokens -0.8 ± 1.3 points keeping 20 % or 30 % (30 prompts); keeping 15 % (43 % of the
    # token-layers) +3.0 ± 3.6 at 2K and +5.7 ± 5.8 at 4K (18 prompts). A revival margin of 0.5
    # changed no score on the 30 prompts at 2K (27 outputs identical). At 4K on 100 prompts:
    # default +6.3 ± 2.7 (no passkey lost in 50, code +0.6 ± 2.6); fast (keeping 10 %, 40 % of
    # the token-layers) +6.1 ± 2.8, KL 0.16. Decoding: on 60 of those prompts, without revival
    # 0.8 ± 0.7 points lower than full revival; reviving only the top half of the selection
    # (revive=0.5) 0.7 ± 0.6 lower, 51 of 60 outputs identical, and it decodes level with the
    # baseline (4K, 3 rounds: x1.03 over the first 16 tokens, x0.99 over 256; full revival
    # x0.89 and x0.88), so default revives so; at 2K on 40 prompts 1.2 ± 1.0 lower (36
    # identical). fast (not measured with it) revives fully.
    # At 2K on 20 prompts fast is +0.0 ± 6.5 but loses 9.9 points on code lines (default +4.5).
    # Decoding: its cost is the revived tokens themselves; cap=2 gave default's answers exactly
    # (20 prompts, 2K) but no faster first 16 tokens at 4K (x0.84 both, 3 rounds), margin=1 lost
    # 1.9 ± 1.9 points: neither is in the preset.
    ("gemma3_text", 18, 640, 4, 1): {
        "fast": f"6:0.1;margin=0.5;{_WINDOW_RULE}",
        "default": f"6:0.15;margin=0.5;revive=0.5;{_WINDOW_RULE}",
        "safe": f"6:0.3;{_WINDOW_RULE}",
    },
    # Qwen2.5-1.5B (and its Coder fine-tune): layers 8 and 14 retrieve (1K probe, recall 1.00).
    # Keeping 25 % after layer 8 (43 % of the token-layers): 12 of 12 answers as the baseline's at
    # 2K, first token 12 of 12, continuation 94 % (9:0.4,15:0.5, 50 %: 6 of 6 and 100 %); a thin
    # sample, a 2K prefill takes 1.5 min. A revival margin of 0.5 makes a 2K prompt's first 15
    # decode steps defer 372 token-layers instead of 1,026 (median step -17 %).
    # At 4K: TTFT x2.74, decode x0.91 (first 16) and x0.97 (256) of the baseline's (stop 24,
    # another day: x2.47, x0.99, x1.06; stop 27: x2.31, x0.83, x0.93, whole request x1.55);
    # every=4 decoded no faster (x0.94, x0.98), so the
    # default selects at every step. At 2K on 42 prompts: +0.8 ± 0.7 points, every passkey and
    # module name as the baseline's; at 16K one passkey kept (7:1024,15:0.5, 28 %, kept it too,
    # but a cut at 7 lost a code line at 2K and one at 8 two of 3 passkeys). Ranking (probe, 12
    # prompts at 2K): after layer 8 the window rule keeps 0.92 of the answer tokens
    # at 10 % kept where the paper's rule keeps 0.28, though on 3 prompts the paper's rule kept a
    # passkey at 10 % that the window rule lost (Qwen writes one digit per token).
    # safe: the previous default, 50 % of the token-layers.
    ("qwen2", 28, 1536, 12, 2): {
        "default": f"9:0.25,15:0.5;margin=0.5;{_WINDOW_RULE}",
        "safe": f"9:0.4,15:0.5;margin=0.5;{_WINDOW_RULE}",
    },
}


def resolve_preset(config: LazyConfig, model: nn.Module) -> LazyConfig:
    """`config` as it applies to `model`: the presets `default`, `fast` and `safe` become, in this
    order, the model's own calibration (stored with it or in the user's store), the calibration
    shipped here for its architecture (CALIBRATED), or the generic layout of config.PRESETS; the
    options given after the preset (`default;norevive`) apply on top. `source` says which."""
    preset = config.from_preset
    if preset not in PRESET_NAMES:
        return config
    own = calibration_store.find(model)
    if own is not None:
        table, source = own.schedules, f"calibrated for this model ({own.origin})"
    elif tuple(architecture_of(model)) in CALIBRATED:
        table, source = CALIBRATED[tuple(architecture_of(model))], "shipped calibration"
    else:
        return replace(config, source=UNCALIBRATED)
    if preset == "fast" and "fast" not in table:
        preset = "default"  # nothing measured prunes harder: never slower than its default
    if preset not in table:
        return replace(config, source=source)
    text = ";".join([table[preset], *config.preset_options])
    parsed = LazyConfig.parse(text)
    return replace(parsed, name=config.name, from_preset=None, preset_options=(), source=source)
