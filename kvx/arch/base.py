"""What kvx needs to know about a base family, in one place per family.

Method code (convert/, profile/) asks the adapter, never ``isinstance(model, Llama...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.kvx_specs import CacheGeometry


@dataclass
class AttentionWeights:
    """One layer's attention projections, as float tensors ``[out, in]`` (biases may be None)."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None


class ArchAdapter:
    """Default behaviour: a Llama-style decoder (``model.model.layers[i].self_attn``)."""

    family: str = "llama"
    model_types: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config

    # -- geometry

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    @property
    def has_qk_norm(self) -> bool:
        return False

    def geometry(self) -> CacheGeometry:
        return CacheGeometry(
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            k_norm=self.has_qk_norm,
            sliding_window=getattr(self.config, "sliding_window", None),
            layer_types=tuple(getattr(self.config, "layer_types", None) or ()),
        )

    def check_supported(self) -> None:
        """Raise ``KvxError`` for configurations the converters cannot honour."""
        from ..errors import KvxError

        rope_params = getattr(self.config, "rope_parameters", None) or {}
        factor = rope_params.get("partial_rotary_factor", getattr(self.config, "partial_rotary_factor", 1.0))
        if factor not in (None, 1.0):
            raise KvxError(f"{self.family}: partial rotary embeddings (factor {factor}) are not supported yet")
        if self.head_dim % 2:
            raise KvxError(f"{self.family}: odd head_dim {self.head_dim}")

    # -- modules

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention(self, model: nn.Module, idx: int) -> nn.Module:
        return self.decoder_layers(model)[idx].self_attn

    @contextmanager
    def attention_replaced(self, model: nn.Module, idx: int, module: nn.Module) -> Iterator[None]:
        """Layer ``idx`` runs ``module`` as its attention inside the block."""
        layer = self.decoder_layers(model)[idx]
        original = layer.self_attn
        layer.self_attn = module
        try:
            yield
        finally:
            layer.self_attn = original

    def layer_prefix(self, idx: int) -> str:
        """Where decoder layer ``idx``'s tensors sit in the model's state dict."""
        return f"model.layers.{idx}."

    def attention_prefix(self, idx: int) -> str:
        """Where layer ``idx``'s attention tensors sit in the model's state dict."""
        return f"{self.layer_prefix(idx)}self_attn."

    def attention_state(self, model: nn.Module, idx: int) -> dict[str, torch.Tensor]:
        """Layer ``idx``'s attention parameters and persistent buffers, by name inside the module,
        floating ones as float32 (what a method's pure weight transform reads)."""
        state = self.attention(model, idx).state_dict()
        return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}

    def attention_weights(self, attn: nn.Module | dict) -> AttentionWeights:
        """q/k/v weights and biases of an attention module (or of its ``attention_state``)."""
        state = attn if isinstance(attn, dict) else attn.state_dict()

        def t(name):
            return None if name not in state else state[name].detach().float()

        return AttentionWeights(
            t("q_proj.weight"),
            t("k_proj.weight"),
            t("v_proj.weight"),
            t("q_proj.bias"),
            t("k_proj.bias"),
            t("v_proj.bias"),
        )

    def lora_targets(self) -> list[str]:
        """Module names LoRA adapts in ``kvx distill --train lora`` (attention and MLP projections)."""
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def sliding_window(self, idx: int) -> int | None:
        """The local attention window of layer ``idx`` (None: the layer attends to everything)."""
        types = getattr(self.config, "layer_types", None)
        if types and types[idx] == "sliding_attention":
            return self.config.sliding_window
        return None

    def qkv(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The layer's real q, k (normed, RoPE applied) and v as ``[B, heads, T, head_dim]``.

        All supported families rotate with HF's ``rotate_half`` layout; one that does not
        overrides this."""
        from ..modeling.kvx_common import project_qkv

        return project_qkv(
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            self.q_norm(attn),
            self.k_norm(attn),
            x,
            cos,
            sin,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
        )

    def native_sliding_config(self, layer_types: list[str], window: int):
        """A copy of the config whose own ``layer_types`` give these layers a sliding window of
        ``window`` keys (query included), or a ``KvxError`` when the family has no such config."""
        from ..errors import KvxError

        raise KvxError(f"{self.family} has no native per-layer sliding-window config; keep the kvx checkpoint")

    def q_norm(self, attn: nn.Module) -> nn.Module | None:
        """The per-head query norm applied before RoPE, if the family has one."""
        return None

    def k_norm(self, attn: nn.Module) -> nn.Module | None:
        """The per-head key norm applied before RoPE, if the family has one."""
        return None

    def k_norm_weight(self, attn: nn.Module | dict) -> torch.Tensor | None:
        """The effective per-dim gain of the per-head key RMS norm (None: no key norm), from the
        module or its ``attention_state``."""
        return None

    def k_norm_eps(self) -> float | None:
        return None

    # -- exports

    def deepseek_export_problem(self) -> str | None:
        """Why DeepSeek-V3's dense block (pre-norms, bias-free gated MLP, plain RoPE, no
        per-head norms) cannot express this family, or None when it can."""
        if self.has_qk_norm:
            return f"{self.family} RMS-normalises keys per head"
        if any(self.sliding_window(i) for i in range(self.n_layers)) or getattr(
            self.config, "use_sliding_window", False
        ):
            return f"this {self.family} model has sliding-window layers"
        rope = dict(getattr(self.config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            return f"RoPE scaling {rope.get('rope_type')!r} does not carry over to DeepSeek's RoPE"
        if getattr(self.config, "mlp_bias", False):
            return "its MLP has biases"
        return None


class QKNormAdapter(ArchAdapter):
    """Families that RMS-normalise q and k per head before RoPE (Qwen3, Gemma3)."""

    @property
    def has_qk_norm(self) -> bool:
        return True

    def q_norm(self, attn):
        return attn.q_norm

    def k_norm(self, attn):
        return attn.k_norm

    def k_norm_weight(self, attn):
        state = attn if isinstance(attn, dict) else attn.state_dict()
        return state["k_norm.weight"].detach().float()

    def k_norm_eps(self) -> float:
        return float(self.config.rms_norm_eps)
