"""KV-cache bytes per token: from the plan (spec) and from the real cache object (measured).

The two must agree layer by layer. A layer whose cache holds less (or more) than its spec
says is an error, never a number: that is what a runtime that silently stops caching (a
renamed transformers argument, say) looks like from outside.
"""

from __future__ import annotations

import torch

from ..arch import get_adapter
from ..arch.deepseek import is_native_mla, native_mla_geometry, native_mla_plan
from ..errors import KvxError
from ..modeling.kvx_common import cache_layers
from ..modeling.modeling_kvx import cache_kwargs, layer_nbytes, make_cache
from ..plan import Plan


def new_cache(model):
    """The cache the model itself would build for ``generate``: kvx's for kvx models."""
    from transformers import DynamicCache

    if getattr(model.config, "kvx", None):
        return make_cache(model.config)
    return DynamicCache(config=model.config)


def dtype_bytes(model) -> int:
    return torch.finfo(next(model.parameters()).dtype).bits // 8


def _plan_and_geometry(model):
    if is_native_mla(model.config):
        return native_mla_plan(model.config), native_mla_geometry(model.config)
    return Plan.from_config(model.config), get_adapter(model.config).geometry()


def layer_bytes_spec(model, n_tokens: int) -> list[int]:
    """What the plan says each layer's cache holds after ``n_tokens`` tokens, at the model dtype."""
    plan, geom = _plan_and_geometry(model)
    return plan.layer_kv_bytes(geom, n_tokens, dtype_bytes(model)) + plan.reference_kv_bytes(
        n_tokens, dtype_bytes(model)
    )


def kv_bytes_per_token_spec(model, n_tokens: int) -> float:
    """What the plan says the cache holds per token after ``n_tokens`` tokens, at the model dtype."""
    return sum(layer_bytes_spec(model, n_tokens)) / n_tokens


def check_layer_bytes(plan: Plan, got: list[int], want: list[int], n_tokens: int, batch: int = 1) -> int:
    """``got`` (bytes each layer's cache holds after ``n_tokens`` tokens of ``batch`` sequences) against
    ``want`` (the plan's, for one sequence); their sum, or a ``KvxError`` naming the first layer that disagrees."""
    if len(got) != len(want):
        raise KvxError(f"the cache has {len(got)} layers but the plan {len(want)}: the runtime built the wrong cache")
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w * batch:
            what = "holds nothing" if g == 0 else f"holds {g} bytes"
            what_layer = (
                f"layer {i} ({plan.layers[i].kind})"
                if i < len(plan.layers)
                else f"reference layer {i - len(plan.layers)}"
            )
            raise KvxError(
                f"{what_layer}: the cache {what} after {n_tokens} tokens, the plan says "
                f"{w * batch}; this runtime does not fill its cache (an unsupported transformers version?)"
            )
    return sum(got)


def checked_nbytes(model, cache, n_tokens: int, batch: int = 1) -> int:
    """Bytes ``cache`` holds after ``n_tokens`` tokens of ``batch`` sequences, checked layer by layer
    against the plan: a ``KvxError`` naming the first layer that disagrees."""
    plan, _ = _plan_and_geometry(model)
    got = [layer_nbytes(layer) for layer in cache_layers(cache)]  # a reference model's included
    return check_layer_bytes(plan, got, layer_bytes_spec(model, n_tokens), n_tokens, batch)


@torch.no_grad()
def kv_bytes_per_token(model, input_ids: torch.Tensor) -> float:
    """Bytes held by the cache object after one forward over ``input_ids`` ([1, n]), per token,
    checked against the plan."""
    cache = new_cache(model)
    model(input_ids=input_ids.to(model.device), use_cache=True, **cache_kwargs(model, cache))
    return checked_nbytes(model, cache, input_ids.shape[-1], input_ids.shape[0]) / input_ids.shape[-1]
