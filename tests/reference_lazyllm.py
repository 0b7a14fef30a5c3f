"""A slow, literal LazyLLM for llama-style tiny models, written independently of the engine.

Python dicts and sets, one token at a time where that is clearest, plain softmax attention: an
oracle for the engine's selections, KV contents, revivals and logits. Only for tests.
"""

from __future__ import annotations

import lazyllm_mlx  # noqa: F401
from lazyllm_mlx.config import Schedule, kept_count

import mlx.core as mx
import numpy as np


class ReferenceLazyLLM:
    def __init__(self, model, schedule: Schedule, windows: list[int | None] | None = None):
        self.model = model
        self.windows = windows or [None] * len(model.layers)
        self.layers = model.layers
        self.schedule = schedule
        self.stage_of = {}
        for k, stage in enumerate(schedule.stages):
            for layer in stage:
                self.stage_of[layer] = k
        self.kv = [dict() for _ in self.layers]  # layer -> {position: (k, v)}
        self.aux = [dict() for _ in schedule.stages]  # stage -> {position: hidden}
        self.length = 0
        self.revived = 0
        self.selections: list[list[list[int]]] = []  # per call, per boundary: selected positions

    def _layer(self, index, hidden, positions, attend, want_scores):
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
        rep = attn.n_heads // attn.n_kv_heads
        outs, scores = [], None
        window = self.windows[index]

        def attention(i, keys_pos):
            keys = mx.stack([self.kv[index][a][0] for a in keys_pos], axis=1)  # (Hkv, m, D)
            qh = q[i].reshape(attn.n_kv_heads, rep, -1)
            logits = (qh * attn.scale) @ keys.transpose(0, 2, 1)  # (Hkv, rep, m)
            return mx.softmax(logits.astype(mx.float32), axis=-1)

        for i, p in enumerate(positions):
            keys_pos = [a for a in attend if a <= p and (window is None or a > p - window)]
            vals = mx.stack([self.kv[index][a][1] for a in keys_pos], axis=1)
            outs.append((attention(i, keys_pos) @ vals).reshape(-1))
            if want_scores and i == n - 1:  # importance over every candidate, window or not
                candidates = [a for a in attend if a <= p]
                probs = attention(i, candidates)
                scores = dict(zip(candidates, np.array(probs.mean(axis=(0, 1))).tolist()))
        h = hidden + attn.o_proj(mx.stack(outs))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, scores

    def step(self, tokens: list[int], revive: bool = True) -> mx.array:
        start = self.length
        new = list(range(start, start + len(tokens)))
        self.length += len(tokens)
        everyone = list(range(self.length))
        hidden = dict(zip(new, self.model.model.embed_tokens(mx.array(tokens))))
        todo, attend = new, everyone
        selections = []
        for k, stage in enumerate(self.schedule.stages):
            if k > 0 and revive:
                keep = kept_count(len(attend), self.schedule.keep[k - 1])
                last = max(attend)
                ranked = sorted(attend, key=lambda p: (p == last, scores[p]), reverse=True)
                selected = sorted(ranked[:keep])
                selections.append(selected)
                first_layer = stage[0]
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
                want = layer == scorer
                h, layer_scores = self._layer(layer, h, todo, attend, want)
                if want:
                    scores = layer_scores
            hidden = dict(zip(todo, h))
        self.selections.append(selections)
        last = max(todo)
        out = self.model.model.norm(hidden[last][None])
        return self.model.model.embed_tokens.as_linear(out)

    def tokens_per_layer(self) -> list[int]:
        return [len(d) for d in self.kv]
