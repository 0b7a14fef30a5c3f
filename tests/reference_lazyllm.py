"""A slow, literal LazyLLM for llama-style tiny models, written independently of the engine.

Python dicts and sets, one token at a time where that is clearest, plain softmax attention: an
oracle for the engine's selections, KV contents, revivals and logits. Only for tests.
"""

from __future__ import annotations

import math

import lazyllm_mlx  # noqa: F401
from lazyllm_mlx.config import LazyConfig, Schedule, boundary_count

import mlx.core as mx
import numpy as np


class ReferenceLazyLLM:
    """`rule`: the LazyConfig whose ranking rule (window, pool, heads, sink, recent) to apply;
    default the paper's (the last token's attention row, head mean)."""

    def __init__(
        self,
        model,
        schedule: Schedule,
        windows: list[int | None] | None = None,
        rule: LazyConfig | None = None,
    ):
        self.model = model
        self.rule = rule or LazyConfig()
        self.windows = windows or [None] * len(model.layers)
        self.layers = model.layers
        self.schedule = schedule
        self.stage_of = {}
        for k, stage in enumerate(schedule.stages):
            for layer in stage:
                self.stage_of[layer] = k
        self.kv = [dict() for _ in self.layers]  # layer -> {position: (k, v)}
        self.queries = [dict() for _ in self.layers]  # layer -> {position: rotated query}
        self.aux = [dict() for _ in schedule.stages]  # stage -> {position: hidden}
        self.length = 0
        self.revived = 0
        self.selections: list[list[list[int]]] = []  # per call, per boundary: selected positions
        self.held: list[list[int]] = []  # the last call's selections (reselect_every)
        self.unselected = 0  # decode steps since the last selection

    def _layer(self, index, hidden, positions, attend):
        """Run layer `index` for tokens `positions` (hidden: (n, D)) attending to `attend`."""
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n = len(positions)
        q = attn.q_proj(x).reshape(n, attn.n_heads, -1)
        k = attn.k_proj(x).reshape(n, attn.n_kv_heads, -1)
        v = attn.v_proj(x).reshape(n, attn.n_kv_heads, -1)
        rope = attn.rope.inner if hasattr(attn.rope, "inner") else attn.rope
        for i, p in enumerate(positions):
            qi = rope(q[i][None, :, None, :], offset=p)[0, :, 0, :]
            ki = rope(k[i][None, :, None, :], offset=p)[0, :, 0, :]
            q[i] = qi
            assert p not in self.kv[index], f"token {p} computed twice at layer {index}"
            self.kv[index][p] = (ki, v[i])
            self.queries[index][p] = qi
        outs = []
        window = self.windows[index]
        for p in positions:
            keys_pos = [a for a in attend if a <= p and (window is None or a > p - window)]
            vals = mx.stack([self.kv[index][a][1] for a in keys_pos], axis=1)
            outs.append((self._attention(index, p, keys_pos) @ vals).reshape(-1))
        h = hidden + attn.o_proj(mx.stack(outs))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def _attention(self, index, p, keys_pos):
        """Softmax probabilities (Hkv, rep, m) of token p's query at layer `index` over keys_pos."""
        attn = self.layers[index].self_attn
        keys = mx.stack([self.kv[index][a][0] for a in keys_pos], axis=1)  # (Hkv, m, D)
        qh = self.queries[index][p].reshape(attn.n_kv_heads, attn.n_heads // attn.n_kv_heads, -1)
        logits = (qh * attn.scale) @ keys.transpose(0, 2, 1)
        return mx.softmax(logits.astype(mx.float32), axis=-1)

    def _scores(self, index, attend):
        """Each candidate's importance at layer `index`: the last `window` tokens' attention
        (each over the candidates at or before it, window layer or not), averaged over them,
        heads combined by mean or max, then averaged over `pool` neighbouring positions."""
        rule = self.rule
        observers = range(max(0, self.length - rule.window), self.length)
        per_head = {a: 0.0 for a in attend}
        for p in observers:
            visible = [a for a in attend if a <= p]
            probs = np.array(self._attention(index, p, visible)).reshape(-1, len(visible))
            for a, column in zip(visible, probs.T):
                per_head[a] = per_head[a] + column / len(observers)
        reduce = np.max if rule.heads == "max" else np.mean
        raw = {a: float(reduce(v)) for a, v in per_head.items()}
        half = rule.pool // 2
        return {
            a: sum(raw.get(b, 0.0) for b in range(a - half, a + half + 1)) / rule.pool
            for a in attend
        }

    def step(self, tokens: list[int], revive: bool = True, decoding: bool = False) -> mx.array:
        start = self.length
        new = list(range(start, start + len(tokens)))
        self.length += len(tokens)
        everyone = list(range(self.length))
        hidden = dict(zip(new, self.model.model.embed_tokens(mx.array(tokens))))
        todo, attend = new, everyone
        selections = []
        every = self.rule.reselect_every
        reuse = decoding and revive and bool(self.held) and self.unselected < every - 1
        for k, stage in enumerate(self.schedule.stages):
            if k > 0 and revive and reuse:  # the last selection and the new tokens
                selected = sorted(self.held[k - 1] + new)
                selections.append(selected)
                attend = selected
            elif k > 0 and revive:
                forced = self.schedule.forced_count(self.length)
                keep = boundary_count(len(attend), self.schedule.keep[k - 1], forced)
                held = self.kv[stage[0]]
                gain = 1.0 + self.rule.revive_margin  # computed tokens hold their place
                ranked = sorted(
                    attend,
                    key=lambda p: (self._always(p), scores[p] * (gain if p in held else 1.0)),
                    reverse=True,
                )
                selected = sorted(ranked[:keep])
                if self.rule.revive_top < 1.0:  # pruned tokens come back only from the top share
                    top = max(math.ceil(self.rule.revive_top * keep), min(keep, forced))
                    eligible = set(ranked[:top])
                    first_layer = stage[0]
                    selected = [
                        p
                        for p in selected
                        if p in eligible or p in todo or p in self.kv[first_layer]
                    ]
                first_layer = stage[0]
                if decoding and self.rule.revive_cap is not None:  # the best few come back per step
                    returning = [
                        p for p in selected if p not in todo and p not in self.kv[first_layer]
                    ]
                    returning.sort(key=lambda p: scores[p], reverse=True)
                    left_out = set(returning[self.rule.revive_cap :])
                    selected = [p for p in selected if p not in left_out]
                selections.append(selected)
                carried = {}
                for p in todo:
                    if p in selected:
                        carried[p] = hidden[p]
                    else:
                        self.aux[k][p] = hidden[p]
                for p in selected:
                    if p not in self.kv[first_layer] and p not in carried:
                        carried[p] = self.aux[k].pop(p)
                        self.revived += 1
                todo = sorted(carried)
                hidden = carried
                attend = selected
            elif k > 0:
                attend = sorted(self.kv[stage[0]]) + [p for p in todo]
                attend = sorted(set(attend))
            h = mx.stack([hidden[p] for p in todo])
            # Scores from the stage's last global layer (a window layer's last token does not see
            # older tokens), else from its last layer.
            scorer = max([layer for layer in stage if self.windows[layer] is None] or [stage[-1]])
            for layer in stage:
                h = self._layer(layer, h, todo, attend)
            if revive and k < len(self.schedule.stages) - 1:
                scores = self._scores(scorer, attend)
            hidden = dict(zip(todo, h))
        self.selections.append(selections)
        self.held = selections
        self.unselected = self.unselected + 1 if reuse else 0
        last = max(todo)
        out = self.model.model.norm(hidden[last][None])
        return self.model.model.embed_tokens.as_linear(out)

    def _always(self, p: int) -> bool:
        """Whether p is always kept: a sink, or among the last `recent` (at least `window`)."""
        recent = max(1, self.rule.window, self.rule.recent)
        return p < self.rule.sink or p >= self.length - recent

    def tokens_per_layer(self) -> list[int]:
        return [len(d) for d in self.kv]
