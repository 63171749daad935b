"""Evicting layers: exact within the budget, a cache that really stops at the budget, the blocks
each policy keeps, and budgets that cannot work refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.convert import convert
from kvx.convert.assemble import convert_model
from kvx.errors import KvxError
from kvx.measure.kv import checked_nbytes, new_cache
from kvx.modeling.kvx_common import cache_kwargs, output_cache
from kvx.modeling.kvx_evict import EvictCacheLayer
from kvx.modeling.kvx_specs import POLICIES
from kvx.plan import EvictSpec, FullSpec, MLASpec, Plan

from .conftest import tiny_model
from .helpers import assert_batch_ops_follow_each_sequence

pytestmark = pytest.mark.runtime

IDS = (torch.arange(3, 140) * 7 % 1000)[None]  # 137 tokens: far past the budgets below


def _evicting(policy: str, budget: int = 32, first_full: bool = True, **fields):
    base = tiny_model("llama")
    n = base.config.num_hidden_layers
    spec = EvictSpec(budget, sink=4, local=8, block=4, policy=policy, **fields)
    plan = Plan([FullSpec() if (first_full and i == 0) else spec for i in range(n)])
    return base, convert_model(base, plan)[0], spec


def _decode(model, ids, prompt: int):
    """Logits of ``ids`` with its first ``prompt`` tokens prefilled, then one token per call."""
    cache = new_cache(model)
    with torch.no_grad():
        out = [model(ids[:, :prompt], **cache_kwargs(model, cache)).logits]
        out += [model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(prompt, ids.shape[-1])]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_above_the_sequence_is_full_attention(policy):
    base, model, _ = _evicting(policy, budget=160)
    with torch.no_grad():
        want = base(IDS, use_cache=False).logits
    for prompt in (1, 50):
        got, _ = _decode(model, IDS, prompt)
        assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prompt", [10, 90])  # a prompt within the budget, and one cut down to it
def test_the_cache_holds_the_budget_and_only_real_tokens(policy, prompt):
    base, model, spec = _evicting(policy)
    _, cache = _decode(model, IDS, prompt)
    n = IDS.shape[-1]
    checked_nbytes(model, cache, n)  # measured bytes == the plan's, layer by layer
    with torch.no_grad():  # the full model's own K/V: layer 1 (after a full layer 0) sees the same input
        full = output_cache(base(IDS, use_cache=True))
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, EvictCacheLayer):
            continue
        assert layer.keys.shape[-2] == spec.budget
        pos = layer.pos[0]  # [H_kv, budget]
        held = pos >= 0
        for h in range(pos.shape[0]):
            p = pos[h][held[h]]
            assert len(set(p.tolist())) == len(p)  # no token twice
            assert set(range(spec.sink)) | set(range(n - spec.local, n)) <= set(p.tolist())
            if i == 1:  # what is held is the real K/V of those tokens, nothing recomputed or merged
                assert_close(layer.keys[0, h][held[h]], full.layers[i].keys[0, h, p], atol=1e-5, rtol=0)
                assert_close(layer.values[0, h][held[h]], full.layers[i].values[0, h, p], atol=1e-5, rtol=0)
        # only the block being written has empty slots
        assert (~held).sum(-1).max() < spec.block


def test_recent_keeps_the_newest_blocks_and_the_sinks():
    _, model, spec = _evicting("recent")
    _, cache = _decode(model, IDS, 20)
    n = IDS.shape[-1]
    newest_block_start = spec.sink + (n - 1 - spec.sink) // spec.block * spec.block
    first_kept = newest_block_start - (spec.budget - spec.sink - spec.block)
    want = set(range(spec.sink)) | set(range(first_kept, n))
    for layer in cache.layers[1:]:
        for h in range(layer.pos.shape[1]):
            assert set(layer.pos[0, h][layer.pos[0, h] >= 0].tolist()) == want


def test_policies_keep_different_tokens_and_heads_choose_their_own():
    kept = {}
    for policy in ("h2o", "snapkv", "previous"):
        _, model, _ = _evicting(policy)
        _, cache = _decode(model, IDS, 90)
        kept[policy] = [layer.pos[0].sort(-1).values for layer in cache.layers[1:]]
    assert not all(torch.equal(a, b) for a, b in zip(kept["h2o"], kept["snapkv"]))
    assert not all(torch.equal(a, b) for a, b in zip(kept["h2o"], kept["previous"]))
    assert any(not torch.equal(p[0], p[1]) for p in kept["previous"])  # each KV head chooses its own


def test_one_call_over_many_tokens_equals_token_by_token():
    _, model, _ = _evicting("h2o")
    want, _ = _decode(model, IDS, 40)
    cache = new_cache(model)
    with torch.no_grad():
        first = model(IDS[:, :40], **cache_kwargs(model, cache)).logits
        rest = model(IDS[:, 40:], **cache_kwargs(model, cache)).logits
    assert_close(torch.cat([first, rest], dim=1), want, atol=1e-4, rtol=0)


def test_generate_with_eviction_and_a_batch():
    _, model, spec = _evicting("previous")
    ids = torch.cat([IDS[:, :60], IDS[:, 60:120]])
    out = model.generate(ids, max_new_tokens=30, do_sample=False, min_new_tokens=30)
    assert out.shape == (2, 90)
    cache = new_cache(model)
    with torch.no_grad():
        model(out, **cache_kwargs(model, cache))
    assert all(layer.keys.shape[-2] == spec.budget for layer in cache.layers[1:])
    checked_nbytes(model, cache, 90, batch=2)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_beam_search_moves_every_slot_and_score_past_the_budget(policy, offload):
    """Prompts past the budget, decoding on past it, the batch reordered between: each sequence's
    slots, positions, scores (and store) move with it; and ``generate`` with beams runs."""
    _, model, _ = _evicting(policy, offload=offload)
    assert_batch_ops_follow_each_sequence(model, torch.cat([IDS[:, :50], IDS[:, 60:110]]), IDS[0, :27].view(3, 9))
    out = model.generate(IDS[:, :50], num_beams=3, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape == (1, 62)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("evict(budget=32, sink=16, local=16, block=16)", "at least"),
        ("evict(budget=100, sink=4, local=8, block=16)", "multiple of the block size"),
        ("evict(budget=64, sink=4, local=16, block=4, policy=oracle)", "unknown"),
    ],
)
def test_impossible_budgets_are_refused_before_any_work(tiny_dir, tmp_path, spec, message):
    out = tmp_path / "out"
    with pytest.raises(KvxError, match=message) as e:
        convert(str(tiny_dir("llama")), out, to=spec, calib="none")
    assert "\n" not in str(e.value) and not out.exists()


def test_an_evicting_checkpoint_reloads_and_decodes_alike(tiny_dir, tmp_path):
    out = tmp_path / "evict"
    convert(str(tiny_dir("llama")), out, to="evict(budget=32, sink=4, local=8, block=4, policy=h2o)", calib="none")
    model = kvx.load(str(out))
    got, cache = _decode(model, IDS, 50)
    assert all(layer.keys.shape[-2] == 32 for layer in cache.layers)
    _, again = _decode(model, IDS, 50)
    assert torch.isfinite(got).all()
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(cache.layers, again.layers))


def test_a_padded_batch_is_refused_not_silently_wrong():
    _, model, _ = _evicting("h2o")
    ids = torch.cat([IDS[:, :20], IDS[:, 20:40]])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with pytest.raises(ValueError, match="padding") as e:
        model(ids, attention_mask=mask)
    assert "\n" not in str(e.value)
    model(ids, attention_mask=torch.ones_like(ids))  # equal lengths: fine


def test_a_converted_checkpoint_is_not_converted_again(tiny_dir, tmp_path):
    """MLA and eviction mix by layer in one plan; a kvx checkpoint's layers are not the family's."""
    mla = tmp_path / "mla"
    convert(str(tiny_dir("llama")), mla, to="mla", kv_rank=8, rope_dims=8, calib="none")
    out = tmp_path / "out"
    with pytest.raises(KvxError, match="already a kvx checkpoint") as e:
        convert(str(mla), out, to="evict(budget=32, sink=4, local=8, block=4)", calib="none")
    assert "\n" not in str(e.value) and not out.exists()
    mixed = Plan([FullSpec(), MLASpec(8, 8, "high"), EvictSpec(32, 4, 8, 4, "previous")])
    convert(str(tiny_dir("llama")), tmp_path / "mixed", plan=mixed, calib="none")
    model = kvx.load(str(tmp_path / "mixed"))
    _, cache = _decode(model, IDS, 50)
    checked_nbytes(model, cache, IDS.shape[-1])
    assert cache.layers[2].keys.shape[-2] == 32
