"""Runtime for kvx checkpoints: the base model with some attention layers swapped.

This file is copied into every checkpoint kvx writes and is loaded there through
``auto_map`` by ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
It must therefore import only torch and transformers, never kvx.

How it works: ``config.json`` is the base model's own config plus a ``kvx`` entry that
holds the per-layer plan. ``KvxForCausalLM`` resolves the base family's native causal-LM
class (e.g. ``LlamaForCausalLM``), subclasses it once, and after the native ``__init__``
replaces the attention module of every layer the plan marks ``mla`` with
``MLAAttention`` and of every ``streaming`` layer with ``StreamingAttention``. Everything else (embeddings, MLP, norms, RoPE, masks, ``generate``)
stays the family's own code, so every family transformers supports behaves as usual.

MLA layer (DeepSeek-V2 style, upcycled from MHA/GQA):
  per token it caches the latent ``c = W_a x`` (``kv_rank`` floats, shared by all heads),
  the RoPE part of the keys for the kept frequency pairs of each KV head, and, for
  families that RMS-normalise keys per head (Qwen3, Gemma3), the per-head 1/rms scale.
  Keys without RoPE and values are recovered as ``W_b c``; while decoding the
  up-projections are absorbed into the query and the output instead ("absorbed form").
  The ``shared`` layout caches one RoPE key for all heads (each query head reads it with
  its KV head's weight in ``rope_mix``); ``deepseek`` adds an RMS norm on the latent
  (``kv_a_layernorm``): DeepSeek-V3's attention exactly, so it exports to ``DeepseekV3ForCausalLM``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

KVX_CONFIG_KEY = "kvx"


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


class MLASlidingCacheLayer(DynamicSlidingWindowLayer):
    """The MLA cache of a sliding-window layer (Gemma3 local layers): keeps the last window only."""

    latent = MLACacheLayer.latent
    k_rope = MLACacheLayer.k_rope


class StreamingCacheLayer(DynamicLayer):
    """Keeps K/V of the first ``sink`` tokens and the last ``window`` tokens, nothing else.

    ``update`` returns this step's visible keys (kept + new) and records their absolute
    positions in ``step_positions`` so the attention can mask by position. The mask sizes
    it reports are those of a full layer (the model's shared full-attention mask may be
    built from it); ``StreamingAttention`` builds its own mask.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.cumulative_length = 0
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

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.positions = self.step_positions = None


def layer_nbytes(layer) -> int:
    """Bytes one cache layer really holds: its own ``nbytes()`` where it has one, else its K/V tensors."""
    if hasattr(layer, "nbytes"):
        return int(layer.nbytes())
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def cache_nbytes(cache: Cache) -> int:
    """Bytes the cache object really holds, summed over layers."""
    return sum(layer_nbytes(layer) for layer in cache.layers)


# --------------------------------------------------------------------------- helpers


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x = [x1 | x2]`` where ``x1[j]`` and ``x2[j]`` form pair ``j`` (HF rotate_half layout)."""
    m = x.shape[-1] // 2
    x1, x2 = x[..., :m], x[..., m:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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

    def __init__(self, base: nn.Module, spec: dict, config, k_norm_eps: float | None):
        super().__init__()
        self.layer_idx = base.layer_idx
        self.scaling = float(base.scaling)
        self.head_dim = hd = int(base.head_dim)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.kv_rank = r = int(spec["kv_rank"])
        rope_dims = int(spec["rope_dims"])
        layout = spec.get("layout", "kvx")
        self.shared = layout in ("shared", "deepseek")
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
        self.absorb = spec.get("absorb", "decode")  # "decode" | "always" | "never"
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
        q_pairs, q_rope_idx, q_nope_idx, q_mix = self._q_indices()
        expand = (bsz, self.n_heads, q_len, -1)
        q_nope = q if self.shared else q.gather(-1, q_nope_idx[None, :, None, :].expand(expand))
        q_rope = q.gather(-1, q_rope_idx[None, :, None, :].expand(expand))
        if q_mix is not None:
            q_rope = q_rope * q_mix.to(q_rope.dtype)
        q_rope = _rotate_pairs(q_rope, *_pair_angles(cos, sin, q_pairs))

        latent, k_rope = self._compress(hidden_states, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)

        absorbed = self.absorb == "always" or (self.absorb == "decode" and q_len == 1)
        run = self._attend_absorbed if absorbed else self._attend_expanded
        out = run(q_nope, q_rope, latent, k_rope, attention_mask, q_len)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out), None

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
        """Attention directly on the latent: W_uk folded into the query, W_uv applied after."""
        c, scale = self._split_latent(latent)
        bsz = c.shape[0]
        w = self.kv_b_proj.weight
        b = self.kv_b_proj.bias
        n_k = self.n_kv * self.nope
        w_uk = w[:n_k].view(self.n_kv, self.nope, self.kv_rank)
        w_uv = w[n_k:].view(self.n_kv, self.head_dim, self.kv_rank)
        group = self.n_heads // self.n_kv
        keys = c[:, None]  # [B, 1, S, r]
        if b is not None:  # a bias is one more latent dimension that is always 1
            w_uk = torch.cat([w_uk, b[:n_k].view(self.n_kv, self.nope, 1)], dim=-1)
            keys = torch.cat([keys, keys.new_ones(*keys.shape[:-1], 1)], dim=-1)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.repeat_interleave(group, dim=0))
        keys = keys.expand(bsz, k_rope.shape[1], -1, -1)  # shared RoPE key: one key head for all
        if scale is not None:
            keys = keys * scale
        k = torch.cat([keys, k_rope], dim=-1)
        q = torch.cat([q_lat, q_rope], dim=-1)
        ctx = self._sdpa(q, k, c[:, None], attention_mask, q_len)  # [B, H, T, r]
        out = torch.einsum("bhtr,hdr->bhtd", ctx, w_uv.repeat_interleave(group, dim=0))
        if b is not None:
            out = out + b[n_k:].view(self.n_kv, 1, self.head_dim).repeat_interleave(group, dim=0)
        return out


class StreamingAttention(nn.Module):
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

    def __init__(self, base: nn.Module, spec: dict, config):
        super().__init__()
        self.layer_idx = base.layer_idx
        self.scaling = float(base.scaling)
        self.head_dim = int(base.head_dim)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)
        self.k_norm = getattr(base, "k_norm", None)
        self.sink, self.window = int(spec["sink"]), int(spec["window"])

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cache = pop_cache(kwargs, past_key_values)
        bsz, t, _ = hidden_states.shape
        q, k, v = project_qkv(
            self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm, hidden_states,
            *position_embeddings, self.n_heads, self.n_kv, self.head_dim,
        )
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
            outs.append(F.scaled_dot_product_attention(q[:, :, c0 : c0 + self.chunk], ks, vs, attn_mask=mask, scale=self.scaling))
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(bsz, t, -1)
        return self.o_proj(out), None


# --------------------------------------------------------------------------- the model


def kvx_layers(config) -> list[dict]:
    """The per-layer specs written by kvx (``config.kvx["layers"]``)."""
    return list(getattr(config, KVX_CONFIG_KEY)["layers"])


def apply_kvx_plan(model: nn.Module) -> None:
    """Swap the attention of every ``mla``/``streaming`` layer of a freshly built base model."""
    config = model.config
    meta = getattr(config, KVX_CONFIG_KEY)
    decoder_layers = model.model.layers
    for idx, spec in enumerate(meta["layers"]):
        base = decoder_layers[idx].self_attn
        if spec["kind"] == "mla":
            decoder_layers[idx].self_attn = MLAAttention(base, spec, config, meta.get("k_norm_eps"))
        elif spec["kind"] == "streaming":
            decoder_layers[idx].self_attn = StreamingAttention(base, spec, config)
        elif spec["kind"] != "full":
            raise ValueError(f"layer {idx}: spec kind {spec['kind']!r} is not supported by this runtime")


def make_cache(config) -> Cache:
    """One cache layer per decoder layer: MLA layers hold latents, streaming layers sinks + window, others full or sliding K/V."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = []
    for spec, layer_type in zip(kvx_layers(config), layer_types):
        sliding = layer_type == "sliding_attention"
        if spec["kind"] == "mla":
            layers.append(MLASlidingCacheLayer(config.sliding_window) if sliding else MLACacheLayer())
        elif spec["kind"] == "streaming":
            layers.append(StreamingCacheLayer(int(spec["sink"]), int(spec["window"])))
        else:
            layers.append(DynamicSlidingWindowLayer(config.sliding_window) if sliding else DynamicLayer())
    return Cache(layers=layers)


_CLASS_CACHE: dict[type, type] = {}


def kvx_class_for(config) -> type:
    """The family's causal-LM class with kvx's layer swap after its own ``__init__``."""
    base_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if base_cls not in _CLASS_CACHE:

        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            apply_kvx_plan(self)

        name = cache_arg(base_cls)

        def forward(self, *args, use_cache=None, **kwargs):
            cache = pop_cache(kwargs)
            if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
                cache = make_cache(self.config)
            return base_cls.forward(self, *args, use_cache=use_cache, **{name: cache}, **kwargs)

        def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
            user_cache = model_kwargs.get(name)
            out = base_cls._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
            if user_cache is None and model_kwargs.get(name) is not None:
                model_kwargs[name] = make_cache(self.config)
            return out

        _CLASS_CACHE[base_cls] = type(
            "Kvx" + base_cls.__name__,
            (base_cls,),
            {
                "__init__": __init__,
                "forward": forward,
                "_prepare_cache_for_generation": _prepare_cache_for_generation,
                "_kvx_base": base_cls,
                "__module__": __name__,
            },
        )
    return _CLASS_CACHE[base_cls]


class KvxForCausalLM(PreTrainedModel):
    """Entry point named in ``auto_map``: dispatches to the family class with kvx's layers."""

    def __new__(cls, config, *args, **kwargs):
        return kvx_class_for(config)(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        kwargs.pop("trust_remote_code", None)
        return kvx_class_for(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return kvx_class_for(config)(config, **kwargs)
