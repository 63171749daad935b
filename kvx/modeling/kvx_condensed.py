"""Layer-condensed KV (LCKV / cross-layer attention): the ``condensed`` runtime.

A layer whose spec names itself as ``source`` is the base attention, untouched, over a cache
layer that also lets other layers see what it just stored. Every other condensed layer keeps
its query and output projections only: its keys and values are its source's. The source may
also be an MLA layer below: the reader's queries then attend that layer's cached latent and
RoPE keys through its up-projections (one latent shared across layers).

A source *below* the reader has already run when the reader does: the reader attends its
source's visible K/V of this step with the reader's own mask (cross-layer attention). A
source *above* it (LCKV proper) has not: token ``t`` attends the source's K/V of tokens
``< t`` only (the diagonal is masked; the first token sees nothing and its attention output is
zero). Prefill therefore iterates the whole model (``CondensedRuntime.forward``): each pass
reads the K/V of the new tokens that the previous pass computed (zeros at first), the cache is
rolled back between passes and keeps the last pass's entries. Token ``t`` is exact after
``t + 1`` passes, so a prompt of ``T`` tokens needs at most ``T`` passes; decoding one token
is one exact pass.

Shipped inside every checkpoint; imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .kvx_common import LayerRuntime, PerSequence, pop_cache, rotate_half_rope, sdpa, tensor_bytes
from .kvx_specs import CondensedSpec, spec_from_dict

# --------------------------------------------------------------------------- cache layers


class _Shared:
    """A source's cache layer: stores K/V as its base class does and remembers, for the readers
    of this step, what ``update`` returned (``visible``) and what it was given (``new``).
    Both are references to this step's tensors, dropped when the model's forward ends."""

    visible: tuple[torch.Tensor, torch.Tensor] | None = None
    new: tuple[torch.Tensor, torch.Tensor] | None = None
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the new tokens' K/V of the previous pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.new = (key_states, value_states)
        self.visible = super().update(key_states, value_states, *args, **kwargs)
        return self.visible

    def past(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The K/V stored before this step (what a reader below the source sees of the past)."""
        if not self.is_initialized or self.keys.numel() == 0:
            return None
        return self.keys, self.values

    def end_step(self) -> None:
        self.visible = self.new = self.pending = None

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class SourceCacheLayer(_Shared, DynamicLayer):
    pass


class SlidingSourceCacheLayer(_Shared, DynamicSlidingWindowLayer):
    pass


class _Reader(PerSequence):
    """A reader's cache layer: holds no K/V, only counts tokens, so that masks and
    ``get_seq_length`` see the layer as the full (or sliding) layer it replaces; beam search
    finds nothing of its own to reorder."""

    def advance(self, n: int) -> None:
        self.cumulative_length = getattr(self, "cumulative_length", 0) + n

    def get_seq_length(self) -> int:
        return getattr(self, "cumulative_length", 0)

    def update(self, *args, **kwargs):
        raise RuntimeError("a condensed reader stores nothing: it reads its source's cache")

    def nbytes(self) -> int:
        return 0


class ReaderCacheLayer(_Reader, DynamicLayer):
    is_croppable = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class SlidingReaderCacheLayer(_Reader, DynamicSlidingWindowLayer):
    is_croppable = False


# --------------------------------------------------------------------------- attention


class CondensedAttention(nn.Module):
    """A layer that attends with its own queries to the K/V of layer ``spec.source``.

    Keeps the base module's query/output projections, query norm, softmax scale and index;
    its key/value projections (and key norm) are gone. Padding masks are applied for sources
    below; for sources above, batch sequences of equal length (as with streaming layers)."""

    def __init__(self, base: nn.Module, spec: CondensedSpec, config):
        super().__init__()
        if getattr(base, "attn_logit_softcapping", None):
            raise ValueError("kvx condensed layers do not support attention logit soft-capping")
        self.layer_idx = base.layer_idx
        self.source = spec.source
        self.above = spec.source > self.layer_idx
        self.scaling = float(base.scaling)
        self.head_dim = int(base.head_dim)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj, self.o_proj = base.q_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self._latent_source: tuple = ()  # (the MLA source's attention module,): not a submodule of this one

    def read_latent_of(self, module: nn.Module) -> None:
        """Attend over an MLA source's latent, through that layer's own up-projections."""
        self._latent_source = (module,)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cache = pop_cache(kwargs, past_key_values)
        if cache is None:
            raise ValueError(f"layer {self.layer_idx} reads layer {self.source}'s K/V: it needs a cache")
        bsz, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, t, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        source = cache.layers[self.source]
        if self._latent_source:  # an MLA source below: its latent and RoPE keys, its maths
            mla = self._latent_source[0]
            out = mla.attend(*mla.split_query(q, *position_embeddings), source.keys, source.values, attention_mask, t)
            cache.layers[self.layer_idx].advance(t)
            return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1)), None
        q = rotate_half_rope(q, *position_embeddings)
        if self.above:
            k, v, mask, seen = self._above(source, q)
            mask = mask[None, None]  # [1, 1, T, S]: the model's mask layout
        else:
            if source.visible is None:
                raise ValueError(f"layer {self.layer_idx}: its source, layer {self.source}, stored nothing this step")
            (k, v), seen, mask = source.visible, None, attention_mask
        cache.layers[self.layer_idx].advance(t)
        out = sdpa(q, k, v, mask, self.scaling)
        if seen is not None:  # a query that sees no key (the very first token) attends to nothing
            out = out * seen[:, None].to(out.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1)), None

    def _above(self, source: _Shared, q: torch.Tensor):
        """K/V a query sees of a source above: the source's past and, for the new tokens, what
        the previous pass computed (zeros in the first), each query only the tokens before it."""
        bsz, _, t, _ = q.shape
        past = source.past()
        new = source.pending
        if new is None:
            zeros = q.new_zeros(bsz, self.n_kv, t, self.head_dim)
            new = (zeros, zeros)
        n_past = 0 if past is None else past[0].shape[-2]
        k = new[0] if past is None else torch.cat([past[0], new[0]], dim=-2)
        v = new[1] if past is None else torch.cat([past[1], new[1]], dim=-2)
        q_pos = torch.arange(n_past, n_past + t, device=q.device)
        mask = torch.arange(n_past + t, device=q.device)[None] < q_pos[:, None]  # strictly before
        seen = mask.any(-1)
        mask = mask | ~seen[:, None]  # a row that sees nothing: any finite row, zeroed after
        return k, v, mask, seen


# --------------------------------------------------------------------------- the runtime


@dataclass
class _Iteration:
    """What the model-level prefill needs: the sources read from below them, and the passes."""

    sources_above: list[int]
    passes: int
    grad_passes: int


def _snapshot(cache) -> list[dict]:
    """Every cache layer's attributes. Cache layers grow by concatenation (new tensors), so a
    shallow copy restores a layer exactly without copying its K/V."""
    return [dict(layer.__dict__) for layer in cache.layers]


def _restore(cache, saved: list[dict]) -> None:
    for layer, attrs in zip(cache.layers, saved):
        layer.__dict__.clear()
        layer.__dict__.update(attrs)


class CondensedRuntime(LayerRuntime):
    kind = "condensed"
    needs_cache = True  # readers find their K/V in the source's cache layer, even without use_cache

    def attention(self, base, spec, config, meta):
        if spec.source == base.layer_idx:
            return base
        return CondensedAttention(base, spec, config)

    def cache_layer(self, spec, config, sliding, layer=None):
        if layer is None or spec.source == layer:
            return SlidingSourceCacheLayer(config.sliding_window) if sliding else SourceCacheLayer()
        return SlidingReaderCacheLayer(config.sliding_window) if sliding else ReaderCacheLayer()

    def init_model(self, model, layers):
        specs = {i: spec_from_dict(model.config.kvx["layers"][i]) for i in layers}
        decoder = model.model.layers
        for i, spec in specs.items():
            source = decoder[spec.source].self_attn
            if spec.source != i and hasattr(source, "split_query"):  # an MLA layer
                decoder[i].self_attn.read_latent_of(source)
        above = [s for i, s in specs.items() if s.source > i]
        model._kvx_condensed = _Iteration(
            sorted({s.source for s in above}),
            above[0].passes if above else 1,
            above[0].grad_passes if above else 0,
        )

    def forward(self, model, forward, **kwargs):
        plan: _Iteration = model._kvx_condensed
        cache = pop_cache(dict(kwargs))
        try:
            if not plan.sources_above:
                return forward(**kwargs)
            return self._iterate(model, forward, cache, plan, kwargs)
        finally:
            for layer in cache.layers:
                if isinstance(layer, _Shared):
                    layer.end_step()

    @staticmethod
    def _iterate(model, forward, cache, plan: _Iteration, kwargs):
        """LCKV's prefill: ``passes`` rounds without gradient, then ``grad_passes`` (with gradient
        when training); never more rounds than new tokens (token ``t`` is exact after ``t + 1``)."""
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        total = plan.passes + plan.grad_passes
        if tokens is not None:
            total = max(1, min(total, tokens.shape[1]))
        grad = torch.is_grad_enabled()
        training = model.training and grad
        free = total - min(plan.grad_passes, total)  # while training, the passes run without gradient
        saved = _snapshot(cache)
        for p in range(total):
            with torch.set_grad_enabled(p >= free if training else grad):
                out = forward(**kwargs)
            if p == total - 1:
                return out
            pending = {j: cache.layers[j].new for j in plan.sources_above}
            _restore(cache, saved)
            for j, new in pending.items():
                cache.layers[j].pending = new
        return out
