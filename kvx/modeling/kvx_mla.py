"""Multi-head latent attention (DeepSeek-V2 style, upcycled from MHA/GQA): the ``mla`` runtime.

Per token the cache holds the latent ``c = W_a x`` (``kv_rank`` floats, shared by all heads),
the RoPE part of the keys for the kept frequency pairs of each KV head, and, for families
that RMS-normalise keys per head (Qwen3, Gemma3), the per-head 1/rms scale. Keys without
RoPE and values are recovered as ``W_b c``; while decoding the up-projections are absorbed
into the query and the output instead ("absorbed form"). The ``shared`` layout caches one
RoPE key for all heads (each query head reads it with its KV head's weight in ``rope_mix``);
``deepseek`` adds an RMS norm on the latent (``kv_a_layernorm``): DeepSeek-V3's attention
exactly, so it exports to ``DeepseekV3ForCausalLM``.

Shipped inside every checkpoint; imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .kvx_common import LayerRuntime, pop_cache, tensor_bytes
from .kvx_specs import MLASpec

# --------------------------------------------------------------------------- cache layers


class MLACacheLayer(DynamicLayer):
    """Grows by one latent row (+ RoPE key) per token; never holds decompressed K/V.

    Stored in the ``keys``/``values`` slots that transformers' ``Cache`` expects:
    ``keys`` = latent ``[B, 1, T, kv_rank (+ n_kv scales)]``, ``values`` = RoPE keys
    ``[B, n_kv, T, rope dims per head]``.
    """

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_rope(self) -> torch.Tensor | None:
        return self.values

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class MLASlidingCacheLayer(DynamicSlidingWindowLayer):
    """The MLA cache of a sliding-window layer (Gemma3 local layers): keeps the last window only."""

    latent = MLACacheLayer.latent
    k_rope = MLACacheLayer.k_rope
    nbytes = MLACacheLayer.nbytes


# --------------------------------------------------------------------------- attention


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x = [x1 | x2]`` where ``x1[j]`` and ``x2[j]`` form pair ``j`` (HF rotate_half layout)."""
    m = x.shape[-1] // 2
    x1, x2 = x[..., :m], x[..., m:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _pair_angles(cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the kept pairs' cos/sin: ``cos [B, T, head_dim]`` -> ``[B, heads, T, m]``."""
    c = cos[..., pairs].permute(0, 2, 1, 3)
    s = sin[..., pairs].permute(0, 2, 1, 3)
    return c, s


class LatentRMSNorm(nn.Module):
    """DeepSeek-V3's ``kv_a_layernorm``: RMS norm in float32, then the gain. transformers builds
    it with its default eps 1e-6 whatever the config's ``rms_norm_eps`` says; so does kvx."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLAAttention(nn.Module):
    """Multi-head latent attention built from a base attention module.

    The base module lends its query/output projections, its query norm (if any), its
    softmax scale and its layer index; K/V projections are replaced by
    ``kv_a_proj`` (down to the latent), ``kv_b_proj`` (latent up to K_nope and V) and
    ``k_rope_proj`` (the kept RoPE dims of K). ``k_scale_proj`` exists only for families
    whose keys are RMS-normalised per head: it feeds the exact per-head 1/rms.
    """

    def __init__(self, base: nn.Module, spec: MLASpec, config, k_norm_eps: float | None):
        super().__init__()
        self.layer_idx = base.layer_idx
        self.scaling = float(base.scaling)
        self.head_dim = hd = int(base.head_dim)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.kv_rank = r = spec.kv_rank
        rope_dims, layout = spec.rope_dims, spec.layout
        self.shared = spec.shared
        rope_heads = 1 if self.shared else self.n_kv  # RoPE keys cached per token
        self.m = m = rope_dims // (2 * rope_heads)  # kept frequency pairs per RoPE key
        self.nope = hd if self.shared else hd - 2 * m
        self.q_proj, self.o_proj = base.q_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm_eps = k_norm_eps
        if getattr(base, "attn_logit_softcapping", None):
            raise ValueError("kvx MLA does not support attention logit soft-capping")
        hidden = config.hidden_size
        k_bias = base.k_proj.bias is not None
        kv_bias = k_bias or base.v_proj.bias is not None
        self.kv_a_proj = nn.Linear(hidden, r, bias=False)
        self.kv_b_proj = nn.Linear(r, self.n_kv * (self.nope + hd), bias=kv_bias)
        self.k_rope_proj = nn.Linear(hidden, rope_heads * 2 * m, bias=k_bias) if m else None
        self.k_scale_proj = nn.Linear(hidden, self.n_kv * hd, bias=k_bias) if k_norm_eps is not None else None
        self.register_buffer("rope_pairs", torch.zeros(rope_heads, m, dtype=torch.long))
        self.kv_a_layernorm = None
        if self.shared:
            if k_norm_eps is not None:
                raise ValueError(f"the {layout} MLA layout does not support per-head key norms")
            self.register_buffer("rope_mix", torch.ones(self.n_kv, m))
        if layout == "deepseek":
            if self.q_proj.bias is not None:  # DeepSeek-V3's plain q projection has no bias
                self.q_proj.register_parameter("bias", None)
            self.kv_a_layernorm = LatentRMSNorm(r)
        self.absorb = "decode"  # "decode" | "always" | "never" (a runtime switch, not part of the spec)
        self._q_idx_key, self._q_idx = None, None

    # -- index bookkeeping (derived from the persistent rope_pairs buffer)

    def _q_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per query head: kept pairs, RoPE dims (x1 | x2), NoPE dims and (shared key)
        the weight its RoPE part gets, following its KV head.

        Derived from the buffers once and reused while they are unchanged (same storage,
        same version): decoding calls this every token in every layer."""
        bufs = [self.rope_pairs] + ([self.rope_mix] if self.shared else [])
        key = tuple((b.data_ptr(), b._version) for b in bufs)
        if key != self._q_idx_key:
            self._q_idx, self._q_idx_key = self._derive_q_indices(), key
        return self._q_idx

    def _derive_q_indices(self):
        group = self.n_heads // self.n_kv
        half = self.head_dim // 2
        if self.shared:
            pairs = self.rope_pairs.expand(self.n_heads, -1)
            rope_idx = torch.cat([pairs, pairs + half], dim=-1)
            nope_idx = torch.arange(self.head_dim, device=pairs.device).expand(self.n_heads, -1)
            mix = self.rope_mix.repeat_interleave(group, dim=0)
            return pairs, rope_idx, nope_idx, torch.cat([mix, mix], dim=-1)[None, :, None, :]
        pairs = self.rope_pairs.repeat_interleave(group, dim=0)  # [H, m]
        rope_idx = torch.cat([pairs, pairs + half], dim=-1)
        keep = torch.ones(self.n_heads, self.head_dim, dtype=torch.bool, device=pairs.device)
        keep.scatter_(1, rope_idx, False)
        nope_idx = keep.nonzero()[:, 1].view(self.n_heads, self.nope)
        return pairs, rope_idx, nope_idx, None

    # -- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = pop_cache(kwargs, past_key_values)
        bsz, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.q_proj(hidden_states).view(bsz, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q_nope, q_rope = self.split_query(q, cos, sin)
        latent, k_rope = self._compress(hidden_states, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)
        out = self.attend(q_nope, q_rope, latent, k_rope, attention_mask, q_len)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out), None

    def split_query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries ``[B, heads, T, head_dim]`` (normed, before RoPE) -> the NoPE part and the rotated
        RoPE part this layer's keys pair with (also what a condensed layer reading this one uses)."""
        bsz, _, q_len, _ = q.shape
        q_pairs, q_rope_idx, q_nope_idx, q_mix = self._q_indices()
        expand = (bsz, self.n_heads, q_len, -1)
        q_nope = q if self.shared else q.gather(-1, q_nope_idx[None, :, None, :].expand(expand))
        q_rope = q.gather(-1, q_rope_idx[None, :, None, :].expand(expand))
        if q_mix is not None:
            q_rope = q_rope * q_mix.to(q_rope.dtype)
        return q_nope, _rotate_pairs(q_rope, *_pair_angles(cos, sin, q_pairs))

    def attend(self, q_nope, q_rope, latent, k_rope, attention_mask, q_len: int) -> torch.Tensor:
        """Attention over the cached latent and RoPE keys: ``[B, heads, T, head_dim]``."""
        absorbed = self.absorb == "always" or (self.absorb == "decode" and q_len == 1)
        run = self._attend_absorbed if absorbed else self._attend_expanded
        return run(q_nope, q_rope, latent, k_rope, attention_mask, q_len)

    def _compress(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """What one token adds to the cache: latent (+ per-KV-head 1/rms) and RoPE keys."""
        bsz, t, _ = x.shape
        latent = self.kv_a_proj(x)
        if self.kv_a_layernorm is not None:
            latent = self.kv_a_layernorm(latent)
        scale = None
        if self.k_scale_proj is not None:
            k_full = self.k_scale_proj(x).view(bsz, t, self.n_kv, self.head_dim).float()
            scale = torch.rsqrt(k_full.pow(2).mean(-1) + self.k_norm_eps).to(latent.dtype)  # [B, T, n_kv]
            latent = torch.cat([latent, scale], dim=-1)
        if self.m:
            k_rope = self.k_rope_proj(x).view(bsz, t, -1, 2 * self.m).transpose(1, 2)
            if scale is not None:
                k_rope = k_rope * scale.transpose(1, 2)[..., None]
            k_rope = _rotate_pairs(k_rope, *_pair_angles(cos, sin, self.rope_pairs))
        else:
            k_rope = latent.new_zeros(bsz, self.rope_pairs.shape[0], t, 0)
        return latent[:, None], k_rope

    def _split_latent(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, 1, S, r (+n_kv)]`` -> latent ``[B, S, r]`` and per-KV-head key scale ``[B, n_kv, S, 1]``."""
        c = latent[:, 0, :, : self.kv_rank]
        if self.k_scale_proj is None:
            return c, None
        return c, latent[:, 0, :, self.kv_rank :].transpose(1, 2)[..., None]

    def _sdpa(self, q, k, v, attention_mask, q_len):
        def per_query_head(t):  # shared latent: a free expand; per-KV-head tensors: GQA repeat
            if t.shape[1] == 1:
                return t.expand(-1, self.n_heads, -1, -1)
            return t.repeat_interleave(self.n_heads // t.shape[1], dim=1)

        k, v = per_query_head(k), per_query_head(v)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, : k.shape[-2]]
        is_causal = mask is None and q_len > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, attention_mask, q_len):
        """Decompress K_nope and V from the latent, then ordinary attention (used for prefill)."""
        c, scale = self._split_latent(latent)
        bsz, s_len, _ = c.shape
        kv = self.kv_b_proj(c)
        k_nope = kv[..., : self.n_kv * self.nope].view(bsz, s_len, self.n_kv, self.nope).transpose(1, 2)
        v = kv[..., self.n_kv * self.nope :].view(bsz, s_len, self.n_kv, self.head_dim).transpose(1, 2)
        if scale is not None:
            k_nope = k_nope * scale
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_kv, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._sdpa(q, k, v, attention_mask, q_len)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, attention_mask, q_len):
        """Attention directly on the latent: W_uk folded into the query, W_uv applied after.

        Scores are two batched matmuls against the cache as it lies (the latent shared by all
        heads, the RoPE keys per key head), never a per-head copy of it: building
        ``[B, heads, S, r + rope]`` keys each step read and wrote ``heads x`` the cache and made
        absorbed decoding slower than the original model's."""
        c, scale = self._split_latent(latent)  # [B, S, r], [B, n_kv, S, 1] | None
        bsz, s_len, _ = c.shape
        n_heads, group, n_k = self.n_heads, self.n_heads // self.n_kv, self.n_kv * self.nope
        w, b = self.kv_b_proj.weight, self.kv_b_proj.bias
        w_uk = w[:n_k].view(self.n_kv, self.nope, self.kv_rank).repeat_interleave(group, dim=0)
        w_uv = w[n_k:].view(self.n_kv, self.head_dim, self.kv_rank).repeat_interleave(group, dim=0)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        scores = (q_lat.reshape(bsz, n_heads * q_len, -1) @ c.transpose(1, 2)).view(bsz, n_heads, q_len, s_len)
        if b is not None:  # the key bias: one more latent dimension that is always 1
            b_k = b[:n_k].view(self.n_kv, self.nope).repeat_interleave(group, dim=0)
            scores = scores + torch.einsum("bhtd,hd->bht", q_nope, b_k)[..., None]
        if scale is not None:  # per-key-head 1/rms of the original keys
            scores = (scores.view(bsz, self.n_kv, -1, s_len) * scale.transpose(-1, -2)).view_as(scores)
        if k_rope.shape[-1]:
            kr = k_rope.shape[1]  # key heads of the RoPE part: n_kv (kvx layout) or 1 (shared)
            rope = q_rope.reshape(bsz, kr, -1, q_rope.shape[-1]) @ k_rope.transpose(-1, -2)
            scores = scores + rope.view_as(scores)
        scores = scores * self.scaling
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, :s_len]
        elif mask is None and q_len > 1:
            mask = torch.ones(q_len, s_len, dtype=torch.bool, device=c.device).tril(s_len - q_len)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.float().softmax(-1).to(c.dtype)
        ctx = (probs.view(bsz, n_heads * q_len, s_len) @ c).view(bsz, n_heads, q_len, -1)  # [B, H, T, r]
        out = torch.einsum("bhtr,hdr->bhtd", ctx, w_uv)
        if b is not None:
            out = out + b[n_k:].view(self.n_kv, 1, self.head_dim).repeat_interleave(group, dim=0)
        return out


class MLARuntime(LayerRuntime):
    kind = "mla"

    def attention(self, base, spec, config, meta):
        return MLAAttention(base, spec, config, meta.get("k_norm_eps"))

    def cache_layer(self, spec, config, sliding, layer=None):
        return MLASlidingCacheLayer(config.sliding_window) if sliding else MLACacheLayer()
