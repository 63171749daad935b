"""Attention mapping (IAM): the ``mapped`` runtime.

A mapped layer takes, for each of its query heads, the attention probabilities of one head of
a *source* layer and applies them to its own values: ``softmax(q_s k_s^T * scale_s) @ V``.
The source is a layer of a smaller reference model of the same family that runs in lockstep
on the same tokens (IAM), or an earlier layer of this model (cross-layer attention sharing).
Either way the source is a ``ProbeAttention``: the base attention, which also leaves its
rotated queries and its visible keys of this step on its cache layer for the layers that map
onto it. The reader then calls SDPA with the source's queries and keys and its own values, so
the probabilities are never materialised, and its own K is never computed (nor cached): its
cache layer holds V only.

The reference model (only its layers up to the deepest one referenced) is a submodule of the
model (``kvx_reference``): its weights are inside the checkpoint. Its cache is attached to the
model's cache (``attach``) on the first step, so ``generate`` and a caller's own cache carry it
along, and ``cache_nbytes`` counts it.

A ``dynamic`` map (IAM's own: chosen at each prefill) compares the layer's own attention of
the prompt's last ``observe`` queries (its Q/K projections are kept for that alone; K is not
cached) with every source head's by cosine similarity, per sequence; decoding reuses the map.

Shipped inside every checkpoint; imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kvx_common import (
    BaseProjections,
    CountingLayer,
    LayerRuntime,
    attach,
    attached,
    cache_kwargs,
    cache_layers,
    pop_cache,
    project_qkv,
    sdpa,
)
from .kvx_specs import MappedSpec, spec_from_dict

REFERENCE = "kvx_reference"  # the model-level module: the reference model's decoder, truncated
REFERENCE_KEY = "reference"  # the entry of ``config.kvx`` that describes it


@dataclass
class Probe:
    """What a source layer leaves for the layers mapped onto it, for one step: its rotated
    queries ``[B, H, T, D]``, its visible keys ``[B, H_kv, S, D]`` and its softmax scale."""

    q: torch.Tensor
    k: torch.Tensor
    scaling: float


class ProbeAttention(BaseProjections):
    """The base attention (same weights, same maths) that also leaves its ``Probe`` on its cache layer."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cache = pop_cache(kwargs, past_key_values)
        if cache is None:
            raise ValueError(f"layer {self.layer_idx} lends its attention to mapped layers: it needs a cache")
        bsz, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, position_embeddings)
        layer = cache.layers[self.layer_idx]
        k, v = layer.update(k, v)
        layer.probe = Probe(q, k, self.scaling)
        out = sdpa(q, k, v, attention_mask, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1)), None


class ValueCacheLayer(CountingLayer):
    """A mapped layer's cache: V only (its keys are the source's). ``head_map``: a dynamic map
    chosen at prefill, ``[B, H]``, kept for decoding."""

    head_map: torch.Tensor | None = None
    per_sequence = ("head_map",)

    def append(self, values: torch.Tensor) -> torch.Tensor:
        if not self.is_initialized:
            self.lazy_initialization(values, values)
        self.values = torch.cat([self.values, values], dim=-2)
        self.cumulative_length += values.shape[-2]
        return self.values

    def update(self, key_states, value_states, *args, **kwargs):
        """What the base attention would store here: V only; the keys given are handed back (used
        by conversion to measure the layer with its base attention)."""
        return key_states, self.append(value_states)

    def reset(self) -> None:
        super().reset()
        self.head_map = None


class MappedAttention(nn.Module):
    """A layer whose heads take a source layer's attention probabilities and apply them to its V."""

    def __init__(self, base: nn.Module, spec: MappedSpec, config):
        super().__init__()
        self.layer_idx = base.layer_idx
        self.spec = spec
        self.head_dim = int(base.head_dim)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.v_proj, self.o_proj = base.v_proj, base.o_proj
        if spec.dynamic:  # for choosing the map at prefill only
            self.q_proj, self.k_proj = base.q_proj, base.k_proj
            self.q_norm, self.k_norm = getattr(base, "q_norm", None), getattr(base, "k_norm", None)
            self.scaling = float(base.scaling)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cache = pop_cache(kwargs, past_key_values)
        where = attached(cache, REFERENCE) if self.spec.model == "reference" and cache is not None else cache
        probe = getattr(where.layers[self.spec.source], "probe", None) if where is not None else None
        if probe is None:
            raise ValueError(
                f"layer {self.layer_idx} maps onto {self.spec.model} layer {self.spec.source}, which lent no attention "
                "this step (run the whole model, with its cache)"
            )
        bsz, t, _ = hidden_states.shape
        layer = cache.layers[self.layer_idx]
        fresh = layer.get_seq_length() == 0
        v = layer.append(self.v_proj(hidden_states).view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2))
        heads = self._head_map(layer, probe, hidden_states, position_embeddings, fresh)  # [B, H]
        q = _take(probe.q, heads)
        k = _take(probe.k, heads // (probe.q.shape[1] // probe.k.shape[1]))
        out = sdpa(q, k, v, attention_mask, probe.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1)), None

    def _head_map(self, layer: ValueCacheLayer, probe: Probe, x, position_embeddings, fresh: bool) -> torch.Tensor:
        bsz, n_src = probe.q.shape[0], probe.q.shape[1]
        if not self.spec.dynamic:
            heads = self.spec.heads or [h * n_src // self.n_heads for h in range(self.n_heads)]
            return torch.tensor(heads, device=probe.q.device).expand(bsz, -1)
        if fresh or layer.head_map is None:
            layer.head_map = self._choose(probe, x, position_embeddings)
        return layer.head_map

    def _choose(self, probe: Probe, x, position_embeddings) -> torch.Tensor:
        """IAM's map: per sequence and head, the source head whose attention of the prompt's last
        ``observe`` queries is most like this head's own (cosine of the flattened maps)."""
        q, k, _ = project_qkv(
            self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm, x, *position_embeddings,
            self.n_heads, self.n_kv, self.head_dim,
        )  # fmt: skip
        rows = min(self.spec.observe, q.shape[2])
        mine = _probs(q[:, :, -rows:], k, self.scaling)  # [B, H, rows, S]
        theirs = _probs(probe.q[:, :, -rows:], probe.k, probe.scaling)  # [B, H_src, rows, S]
        sim = F.normalize(mine.flatten(2), dim=-1) @ F.normalize(theirs.flatten(2), dim=-1).transpose(1, 2)
        return sim.argmax(-1)


def _take(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``x[b, heads[b]]`` for every sequence ``b``: ``[B, len(heads), T, D]``."""
    return torch.gather(x, 1, heads[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))


def _probs(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities of the last ``q.shape[2]`` positions over all ``k``, float32."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    rows, keys = q.shape[2], k.shape[2]
    future = torch.arange(keys, device=q.device)[None] > torch.arange(keys - rows, keys, device=q.device)[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1)


# --------------------------------------------------------------------------- the reference model


def build_reference(described: dict) -> nn.Module:
    """The reference model's decoder (layers up to the deepest referenced one), from ``config.kvx``'s
    description; its referenced layers lend their attention (``ProbeAttention``)."""
    from transformers import AutoConfig

    from .modeling_kvx import kvx_class_for

    data = dict(described["config"])
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    decoder = kvx_class_for(config)(config).model
    for j in described["sources"]:
        decoder.layers[j].self_attn = ProbeAttention(decoder.layers[j].self_attn, config)
    return decoder


class MappedRuntime(LayerRuntime):
    kind = "mapped"
    needs_cache = True  # mapped layers find their source's queries and keys on its cache layer

    def attention(self, base, spec, config, meta):
        return MappedAttention(base, spec, config)

    def cache_layer(self, spec, config, sliding, layer=None):
        return ValueCacheLayer()

    def init_model(self, model, layers):
        specs = [spec_from_dict(model.config.kvx["layers"][i]) for i in layers]
        decoder = model.model.layers
        for j in sorted({s.source for s in specs if s.model == "self"}):
            if not isinstance(decoder[j].self_attn, ProbeAttention):
                decoder[j].self_attn = ProbeAttention(decoder[j].self_attn, model.config)
        if any(s.model == "reference" for s in specs):
            model.add_module(REFERENCE, build_reference(model.config.kvx[REFERENCE_KEY]))

    def forward(self, model, forward, **kwargs):
        cache = pop_cache(dict(kwargs))
        try:
            reference = getattr(model, REFERENCE, None)
            if reference is not None:
                self._run_reference(model, reference, cache, kwargs)
            return forward(**kwargs)
        finally:
            for layer in cache_layers(cache):
                layer.__dict__.pop("probe", None)

    @staticmethod
    def _run_reference(model, reference: nn.Module, cache, kwargs: dict) -> None:
        """The reference model's step on the same tokens, into its own cache (attached to this one)."""
        from .modeling_kvx import make_cache

        if kwargs.get("input_ids") is None:
            raise ValueError("a model with a reference model needs input_ids (the reference reads the same tokens)")
        ref_cache = attached(cache, REFERENCE)
        if ref_cache is None:
            if cache.get_seq_length() > 0:
                raise ValueError("this cache was filled without the reference model: start from an empty cache")
            ref_cache = attach(cache, REFERENCE, make_cache(reference.config))
        passed = {k: kwargs[k] for k in ("attention_mask", "position_ids", "cache_position") if k in kwargs}
        reference(input_ids=kwargs["input_ids"], use_cache=True, **passed, **cache_kwargs(reference, ref_cache))
