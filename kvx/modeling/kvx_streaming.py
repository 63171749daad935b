"""Attention sinks + a recent window (LightTransfer / StreamingLLM): the ``streaming`` runtime.

The layer keeps the base model's own projections; its cache keeps K/V of the first ``sink``
and the last ``window`` tokens only, so it stops growing at ``sink + window``.

Shipped inside every checkpoint; imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kvx_common import BaseProjections, CountingLayer, LayerRuntime, pop_cache
from .kvx_specs import StreamingSpec


class StreamingCacheLayer(CountingLayer):
    """Keeps K/V of the first ``sink`` tokens and the last ``window`` tokens, nothing else.

    ``update`` returns this step's visible keys (kept + new) and records their absolute
    positions in ``step_positions`` so the attention can mask by position. The mask sizes
    it reports are those of a full layer (the model's shared full-attention mask may be
    built from it); ``StreamingAttention`` builds its own mask.
    """

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.positions: torch.Tensor | None = None
        self.step_positions: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        n = key_states.shape[-2]
        new = torch.arange(self.cumulative_length, self.cumulative_length + n, device=key_states.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, new])
        self.cumulative_length += n
        keep = (positions < self.sink) | (positions >= self.cumulative_length - self.window)
        self.keys, self.values, self.positions = keys[:, :, keep], values[:, :, keep], positions[keep]
        self.step_positions = positions
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.positions = self.step_positions = None


class StreamingAttention(BaseProjections):
    """Attention sinks + a recent window (LightTransfer / StreamingLLM) over the base weights.

    Query at absolute position ``p`` attends keys ``j <= p`` with ``j < sink`` or
    ``j >= p - window``: exactly full attention while the sequence has at most
    ``sink + window + 1`` tokens. Keys keep the RoPE of their original positions (no
    re-rotation into cache positions): exact below the window, and right for contexts
    within what the model was trained on. Long prompts are processed a chunk of queries at
    a time against only the keys they can see, so no full attention matrix is formed.
    Padding masks are not applied here: batch sequences of equal length.
    """

    chunk = 512

    def __init__(self, base: nn.Module, spec: StreamingSpec, config):
        super().__init__(base, config)
        self.sink, self.window = spec.sink, spec.window

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cache = pop_cache(kwargs, past_key_values)
        bsz, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            key_pos = cache.layers[self.layer_idx].step_positions
        else:
            key_pos = torch.arange(t, device=q.device)
        q_pos = key_pos[-t:]
        group = self.n_heads // self.n_kv
        outs = []
        for c0 in range(0, t, self.chunk):
            qp = q_pos[c0 : c0 + self.chunk]
            visible = (key_pos < self.sink) | ((key_pos >= qp[0] - self.window) & (key_pos <= qp[-1]))
            kp = key_pos[visible]
            mask = (kp[None] <= qp[:, None]) & ((kp[None] < self.sink) | (kp[None] >= qp[:, None] - self.window))
            ks = k[:, :, visible].repeat_interleave(group, dim=1)
            vs = v[:, :, visible].repeat_interleave(group, dim=1)
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, c0 : c0 + self.chunk], ks, vs, attn_mask=mask, scale=self.scaling
                )
            )
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(bsz, t, -1)
        return self.o_proj(out), None


class StreamingRuntime(LayerRuntime):
    kind = "streaming"

    def attention(self, base, spec, config, meta):
        return StreamingAttention(base, spec, config)

    def cache_layer(self, spec, config, sliding, layer=None):
        return StreamingCacheLayer(spec.sink, spec.window)
