"""What every kvx runtime file shares: the layer-runtime interface, RoPE and q/k/v maths, cache
byte counts, and the bridge between transformers versions.

Shipped inside every checkpoint; imports only torch and transformers. kvx's ``arch/`` imports
the q/k/v maths from here, so there is one copy of it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

# --------------------------------------------------------------------------- transformers versions
# transformers 5.24 renamed the cache argument of models, decoder layers and attention modules
# from ``past_key_values`` to ``cache`` (the old name warns). A checkpoint's runtime is run by
# whatever transformers its user has, so it reads either name and passes the cache on under
# the name the installed version expects.

OLD_CACHE_ARG, NEW_CACHE_ARG = "past_key_values", "cache"


def cache_arg(model_or_cls) -> str:
    """The keyword under which this model class's ``forward`` takes its cache."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    cls = getattr(cls, "_kvx_base", cls)
    params = inspect.signature(cls.forward).parameters
    return NEW_CACHE_ARG if NEW_CACHE_ARG in params else OLD_CACHE_ARG


def cache_kwargs(model, cache: Cache | None) -> dict:
    """``{name: cache}`` for calling ``model(...)`` without a deprecation warning on any version."""
    return {cache_arg(model): cache}


def pop_cache(kwargs: dict, *given) -> Cache | None:
    """The cache a caller passed, under either name (``given``: explicit arguments already bound)."""
    found = [c for c in (*given, kwargs.pop(NEW_CACHE_ARG, None), kwargs.pop(OLD_CACHE_ARG, None)) if c is not None]
    return found[0] if found else None


def output_cache(output) -> Cache | None:
    """The cache a model output or ``generate`` result carries (``.cache`` from 5.24 on)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, NEW_CACHE_ARG if NEW_CACHE_ARG in fields else OLD_CACHE_ARG, None)


# --------------------------------------------------------------------------- cache bytes


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def layer_nbytes(layer) -> int:
    """Bytes one cache layer really holds: its own ``nbytes()`` where it has one (a layer that
    aliases another's tensors, keeps V only or evicts knows best), else its K/V tensors."""
    if hasattr(layer, "nbytes"):
        return int(layer.nbytes())
    return tensor_bytes(layer.keys, layer.values)


def cache_nbytes(cache: Cache) -> int:
    """Bytes the cache object really holds, summed over its layers and those of the caches attached to it."""
    return sum(layer_nbytes(layer) for layer in cache_layers(cache))


# --------------------------------------------------------------------------- caches run in lockstep
# A model that runs a second model on the same tokens (a reference model) keeps that model's
# cache attached to its own, so that ``generate`` and a caller's cache carry both.

ATTACHED = "kvx_attached"


def attach(cache: Cache, name: str, other: Cache) -> Cache:
    cache.__dict__.setdefault(ATTACHED, {})[name] = other
    return other


def attached(cache: Cache | None, name: str) -> Cache | None:
    return None if cache is None else cache.__dict__.get(ATTACHED, {}).get(name)


def cache_layers(cache: Cache | None) -> list:
    """The cache's layers, then those of the caches attached to it (in order of attachment)."""
    if cache is None:
        return []
    return [*cache.layers, *(layer for other in cache.__dict__.get(ATTACHED, {}).values() for layer in other.layers)]


class PerSequence:
    """A cache layer whose state beyond K/V is indexed by sequence (dim 0): beam search reorders,
    contrastive search repeats and selects the batch, and every such tensor must follow, or the
    next step mixes one sequence's state with another's. ``per_sequence`` names those tensors;
    tensors of fewer than 2 dims (positions shared by the batch, an empty placeholder) stay."""

    per_sequence: tuple[str, ...] = ()

    def _each_sequence_tensor(self, fn) -> None:
        for name in ("keys", "values", *self.per_sequence):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each_sequence_tensor(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each_sequence_tensor(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each_sequence_tensor(lambda t: t[indices])


class KvxCache(Cache):
    """transformers' ``Cache`` whose batch operations (beam search's reorder, contrastive
    search's repeat and select) reach the layers of the caches attached to it too (a reference
    model's): the layers ``cache_layers`` counts are the layers these move."""

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in cache_layers(self):
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        for layer in cache_layers(self):
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in cache_layers(self):
            layer.batch_select_indices(indices)


class CountingLayer(PerSequence, DynamicLayer):
    """A cache layer that holds fewer tokens than it has seen (it keeps a window, or evicts):
    it counts the tokens itself, reports the mask sizes of a full layer (its attention masks by
    position itself) and counts only K/V as cache bytes (positions and scores are bookkeeping)."""

    is_sliding = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.cumulative_length = 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


# --------------------------------------------------------------------------- the layer-runtime interface


class LayerRuntime:
    """How one spec kind runs: the attention module that replaces the base one, the cache
    layer it fills, and optional model-level hooks. One subclass per ``kvx_<kind>.py``, one
    line in ``modeling_kvx.RUNTIMES``. The defaults are those of a ``full`` layer."""

    kind: str = "full"
    needs_cache: bool = False  # layers read other layers' cache entries: the model makes a cache even without use_cache

    def attention(self, base: nn.Module, spec, config, meta: dict) -> nn.Module:
        """The layer's attention module, built around the base model's freshly made one."""
        return base

    def cache_layer(self, spec, config, sliding: bool, layer: int | None = None):
        """The cache layer of decoder layer ``layer`` (``sliding``: the base layer has a local window)."""
        return DynamicSlidingWindowLayer(config.sliding_window) if sliding else DynamicLayer()

    def init_model(self, model: nn.Module, layers: list[int]) -> None:
        """Model-level state the kind needs once per model (a shared predictor, a reference model)."""

    def forward(self, model: nn.Module, forward, **kwargs):
        """Wrap the model's forward (a multi-pass prefill, say); ``forward(**kwargs)`` runs the rest.
        Only kinds that override this are called."""
        return forward(**kwargs)


# --------------------------------------------------------------------------- RoPE and projections


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, T, D]`` over ``k``/``v`` with fewer (or as many) heads, under the
    model's mask cut to the keys (None: causal, as the model's own SDPA path does)."""
    group_k, group_v = q.shape[1] // k.shape[1], q.shape[1] // v.shape[1]
    k, v = k.repeat_interleave(group_k, dim=1), v.repeat_interleave(group_v, dim=1)
    mask = attention_mask[:, :, :, : k.shape[-2]] if attention_mask is not None else None
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's RoPE (``rotate_half`` layout) with ``cos``/``sin`` of shape ``[B, T, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def project_qkv(q_proj, k_proj, v_proj, q_norm, k_norm, x, cos, sin, n_heads, n_kv, head_dim):
    """A base attention layer's q, k (per-head norms, RoPE) and v, as ``[B, heads, T, head_dim]``."""
    bsz, t, _ = x.shape

    def heads(y, n):
        return y.view(bsz, t, n, head_dim).transpose(1, 2)

    q, k, v = heads(q_proj(x), n_heads), heads(k_proj(x), n_kv), heads(v_proj(x), n_kv)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin), v


class BaseProjections(nn.Module):
    """An attention module that keeps the base layer's own q/k/v/o projections and q/k norms
    (under the base names, so checkpoints store them as the base model does) and changes only
    what is cached and attended."""

    def __init__(self, base: nn.Module, config):
        super().__init__()
        self.layer_idx = base.layer_idx
        self.scaling = float(base.scaling)
        self.head_dim = int(base.head_dim)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)

    def qkv(self, hidden_states, position_embeddings):
        """q, k (normed, rotated) and v as ``[B, heads, T, head_dim]``."""
        return project_qkv(
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.q_norm,
            self.k_norm,
            hidden_states,
            *position_embeddings,
            self.n_heads,
            self.n_kv,
            self.head_dim,
        )
