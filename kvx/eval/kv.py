"""KV-cache bytes per token: from the plan (spec) and from the real cache object (measured)."""

from __future__ import annotations

import torch

from ..arch import get_adapter
from ..arch.deepseek import is_native_mla, native_mla_geometry, native_mla_plan
from ..modeling.modeling_kvx import cache_nbytes, make_cache
from ..plan import Plan


def new_cache(model):
    """The cache the model itself would build for ``generate``: kvx's for kvx models."""
    from transformers import DynamicCache

    if getattr(model.config, "kvx", None):
        return make_cache(model.config)
    return DynamicCache(config=model.config)


def dtype_bytes(model) -> int:
    return torch.finfo(next(model.parameters()).dtype).bits // 8


def kv_bytes_per_token_spec(model, n_tokens: int) -> float:
    """What the plan says the cache holds per token after ``n_tokens`` tokens, at the model dtype."""
    if is_native_mla(model.config):
        plan, geom = native_mla_plan(model.config), native_mla_geometry(model.config)
    else:
        plan, geom = Plan.from_config(model.config), get_adapter(model.config).geometry()
    return plan.kv_bytes(geom, n_tokens, dtype_bytes(model)) / n_tokens


@torch.no_grad()
def kv_bytes_per_token(model, input_ids: torch.Tensor) -> float:
    """Bytes held by the cache object after one forward over ``input_ids`` ([1, n]), per token."""
    cache = new_cache(model)
    model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True)
    return cache_nbytes(cache) / input_ids.shape[-1]
