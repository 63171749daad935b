"""The offload mode: the full K/V kept in a second store, attention over the chosen slots only.

The oracle is the simulation kvx refuses to ship: the full cache with every step's attention
masked to the tokens the offload layer chose. Logits must match it exactly, step by step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.cache_utils import Cache, DynamicLayer

from kvx.measure.kv import checked_nbytes, new_cache
from kvx.modeling.kvx_common import cache_kwargs, output_cache, pop_cache
from kvx.modeling.kvx_evict import EvictAttention, OffloadCacheLayer
from kvx.modeling.kvx_specs import POLICIES

from .test_evict import IDS, _decode, _evicting

pytestmark = pytest.mark.runtime


class _Masked(nn.Module):
    """The offload layer's projections over a full ``DynamicLayer``: the prompt attended causally,
    each later token only over the positions ``chosen`` (one ``[B, H_kv, slots]`` per step, -1:
    empty slot) recorded from the offload run."""

    def __init__(self, attn: EvictAttention, chosen: list[torch.Tensor]):
        super().__init__()
        self.attn, self.chosen = attn, iter(chosen)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
        a, cache = self.attn, pop_cache(kw, past_key_values)
        q, k, v = a.qkv(hidden_states, position_embeddings)
        keys, values = cache.layers[a.layer_idx].update(k, v)
        b, h, t, d = q.shape
        qg = q.reshape(b, a.n_kv, h // a.n_kv, t, d)
        scores = (qg @ keys[:, :, None].transpose(-1, -2)) * a.scaling  # [B, H_kv, group, t, T]
        n = keys.shape[-2]
        if t > 1:
            allowed = torch.ones(t, n, dtype=torch.bool).tril(n - t)[None, None, None]
        else:
            pos = next(self.chosen)
            allowed = torch.zeros(b, a.n_kv, n + 1, dtype=torch.bool).scatter_(-1, pos.where(pos >= 0, n), True)
            allowed = allowed[..., :n][:, :, None, None]
        out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values[:, :, None]
        return a.o_proj(out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, -1)), None


def _recorded_decode(model, prompt: int):
    """Logits as ``_decode`` gives them, and for each offload layer the slots every later step attended."""
    chosen: dict[int, list] = {}
    cache = None

    def hook(i):
        def record(module, args, kwargs, output):
            if kwargs["hidden_states"].shape[1] == 1:
                chosen.setdefault(i, []).append(cache.layers[i].pos.clone())

        return record

    attns = {i: layer.self_attn for i, layer in enumerate(model.model.layers)}
    handles = [
        a.register_forward_hook(hook(i), with_kwargs=True) for i, a in attns.items() if isinstance(a, EvictAttention)
    ]
    cache = new_cache(model)
    with torch.no_grad():
        out = [model(IDS[:, :prompt], **cache_kwargs(model, cache)).logits]
        out += [model(IDS[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(prompt, IDS.shape[-1])]
    for handle in handles:
        handle.remove()
    return torch.cat(out, dim=1), cache, chosen


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prompt", [10, 90])
def test_offload_logits_equal_the_masked_full_cache_with_the_same_choice(policy, prompt):
    _, model, spec = _evicting(policy, offload=True, refresh=3)
    got, cache, chosen = _recorded_decode(model, prompt)
    n = IDS.shape[-1]
    checked_nbytes(model, cache, n)  # the compute device holds the budget
    for layer in cache.layers[1:]:
        assert isinstance(layer, OffloadCacheLayer) and layer.keys.shape[-2] == spec.budget
        assert layer.store_k.shape[-2] == n and layer.offloaded_nbytes() == 2 * layer.store_k.numel() * 4
    attns = {i: layer.self_attn for i, layer in enumerate(model.model.layers)}
    for i, steps in chosen.items():
        assert len(steps) == n - prompt
        model.model.layers[i].self_attn = _Masked(attns[i], steps)
    full = Cache(layers=[DynamicLayer() for _ in model.model.layers])
    with torch.no_grad():
        want = [model(IDS[:, :prompt], **cache_kwargs(model, full)).logits]
        want += [model(IDS[:, t : t + 1], **cache_kwargs(model, full)).logits for t in range(prompt, n)]
    for i, attn in attns.items():
        model.model.layers[i].self_attn = attn
    assert_close(got, torch.cat(want, dim=1), atol=1e-4, rtol=0)


def test_offload_brings_evicted_blocks_back():
    """Unlike eviction, a block left out of the slots stays in the store and can be chosen again."""
    _, model, spec = _evicting("previous", offload=True)
    _, cache, chosen = _recorded_decode(model, 10)
    came_back = False
    for steps in chosen.values():
        seen_out = set()
        for before, after in zip(steps, steps[1:]):
            b, a = set(before[0, 0].tolist()), set(after[0, 0].tolist())
            came_back |= bool(seen_out & a)
            seen_out |= b - a - {-1}
    assert came_back


def test_a_budget_above_the_sequence_is_full_attention_with_offload():
    base, model, _ = _evicting("h2o", budget=160, offload=True)
    with torch.no_grad():
        want = base(IDS, use_cache=False).logits
    got, _ = _decode(model, IDS, 50)
    assert_close(got, want, atol=1e-4, rtol=0)


def test_generate_with_offload_and_a_batch():
    _, model, spec = _evicting("previous", offload=True, refresh=2)
    ids = torch.cat([IDS[:, :60], IDS[:, 60:120]])
    result = model.generate(ids, max_new_tokens=30, do_sample=False, min_new_tokens=30, return_dict_in_generate=True)
    assert result.sequences.shape == (2, 90)
    cache = output_cache(result)  # the cache generate decoded with
    assert all(layer.keys.shape[-2] == spec.budget and layer.store_k.shape[-2] == 89 for layer in cache.layers[1:])
    checked_nbytes(model, cache, 89, batch=2)
