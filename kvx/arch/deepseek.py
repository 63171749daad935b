"""DeepSeek-V3 checkpoints (what ``kvx export --format deepseek`` writes): kvx does not convert
them, but it evaluates them, so their cache is described here as a plan of MLA layers."""

from __future__ import annotations

from ..modeling.kvx_specs import CacheGeometry, MLASpec
from ..plan import Plan

MODEL_TYPES = ("deepseek_v3",)


def is_native_mla(config) -> bool:
    """A DeepSeek-V3 config (an object, or a ``config.json`` dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type in MODEL_TYPES


def native_mla_plan(config) -> Plan:
    """Every layer caches the normalised latent plus one shared RoPE key."""
    spec = MLASpec(config.kv_lora_rank, config.qk_rope_head_dim, "high", "deepseek")
    return Plan([spec] * config.num_hidden_layers, getattr(config, "_name_or_path", None))


def native_mla_geometry(config) -> CacheGeometry:
    return CacheGeometry(
        n_kv_heads=config.num_key_value_heads, head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim
    )
