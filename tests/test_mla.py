"""MLA conversion: exact at full rank for every family, real latent cache, both attention forms."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import kvx
from kvx.arch import get_adapter
from kvx.convert import convert
from kvx.data import token_windows
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.modeling.kvx_common import cache_kwargs, output_cache
from kvx.modeling.kvx_mla import MLAAttention, MLACacheLayer, MLASlidingCacheLayer
from kvx.plan import FullSpec, MLASpec, Plan

from .conftest import FAMILIES

# Runtime behaviour: run again under the oldest transformers of the declared range (.ci/run).
pytestmark = pytest.mark.runtime

SMALL = dict(calib_tokens=1024, calib_seq_len=128)


def _ids(tokenizer, n=48, batch=2):
    return token_windows(tokenizer, "bundled", "eval", n * batch, n)


def _set_absorb(model, mode: str):
    for m in model.modules():
        if isinstance(m, MLAAttention):
            m.absorb = mode


def _decode_matches(base, conv, ids, steps=6, atol=1e-4):
    """Prefill, then decode token by token with each model's own cache; logits agree every step."""
    cb, cc = new_cache(base), new_cache(conv)
    with torch.no_grad():
        prompt = ids[:, :-steps]
        assert_close(
            conv(prompt, **cache_kwargs(conv, cc)).logits,
            base(prompt, **cache_kwargs(base, cb)).logits,
            atol=atol,
            rtol=0,
        )
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            step = ids[:, t : t + 1]
            assert_close(
                conv(step, **cache_kwargs(conv, cc)).logits,
                base(step, **cache_kwargs(base, cb)).logits,
                atol=atol,
                rtol=0,
            )
    return cc


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_all_rope_is_lossless(family, tiny_dir, tmp_path, tokenizer):
    src = tiny_dir(family)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank="full", rope_dims="all", **SMALL)
    conv = kvx.load(str(out))
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in conv.model.layers)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert_close(conv(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    for mode in ("never", "always"):  # expanded and absorbed decoding both exact
        _set_absorb(conv, mode)
        _decode_matches(base, conv, ids)


@pytest.mark.parametrize(
    ("family", "select"), [(f, "high") for f in FAMILIES] + [("llama", "low"), ("qwen3", "uniform")]
)
def test_partial_rope_equals_base_without_rope_on_dropped_pairs(family, select, tiny_dir, tmp_path, tokenizer):
    """Keeping m frequency pairs is exactly the base model with the other pairs'
    frequencies set to zero (NoPE): checks the partial-RoPE bookkeeping."""
    src = tiny_dir(family)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    a = get_adapter(base.config)
    m = a.head_dim // 4
    out = tmp_path / "mla"
    # no fitting: it would move the layer towards the original, away from its NoPE equivalent
    convert(str(src), out, kv_rank="full", rope_dims=2 * m * a.n_kv_heads, rope_select=select, fit_steps=0, **SMALL)
    conv = kvx.load(str(out))
    kept = conv.model.layers[0].self_attn.rope_pairs[0]
    dropped = torch.ones(a.head_dim // 2, dtype=torch.bool)
    dropped[kept] = False
    ids = _ids(tokenizer)
    with torch.no_grad():
        drifted = (conv(ids).logits - base(ids).logits).abs().max()
        for name, buf in base.named_buffers():
            if name.endswith("inv_freq"):
                buf[dropped] = 0
        assert_close(conv(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    assert drifted > 1e-3  # dropping RoPE really changed the model: the check above is not vacuous
    _set_absorb(conv, "always")
    _decode_matches(base, conv, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_only_full_rank_is_lossless(family, tiny_dir, tmp_path, tokenizer):
    src = tiny_dir(family)
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank="full", rope_dims="all", calib="none")
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    conv = kvx.load(str(out))
    assert Plan.from_config(conv.config).layers[0].rope_select == "high"
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert_close(conv(ids).logits, base(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_low_rank_cache_holds_only_latent_and_rope_key(family, tiny_dir, tmp_path, tokenizer):
    src = tiny_dir(family)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    a = get_adapter(base.config)
    rope_dims, kv_rank = 2 * a.n_kv_heads * 2, 8  # two pairs per KV head, latent of 8
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank=kv_rank, rope_dims=rope_dims, **SMALL)
    conv = kvx.load(str(out))
    ids = _ids(tokenizer, n=40, batch=1)  # longer than gemma3's local window (16)
    cache = new_cache(conv)
    with torch.no_grad():
        conv(ids, **cache_kwargs(conv, cache))
    scales = a.n_kv_heads if a.has_qk_norm else 0
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, (MLACacheLayer, MLASlidingCacheLayer))
        assert layer.latent.shape[-1] == kv_rank + scales
        assert layer.k_rope.shape[1] * layer.k_rope.shape[-1] == rope_dims
        sliding = a.geometry().layer_types and a.geometry().layer_types[i] == "sliding_attention"
        assert layer.latent.shape[-2] == (15 if sliding else 40)
    measured = kv_bytes_per_token(conv, ids)
    assert measured == kv_bytes_per_token_spec(conv, ids.shape[-1])
    assert measured < kv_bytes_per_token(base, ids)
    # absorbed decoding equals expanded decoding at low rank too
    with torch.no_grad():
        _set_absorb(conv, "never")
        ref = conv(ids).logits
        _set_absorb(conv, "always")
        assert_close(conv(ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hybrid_plan_is_lossless_and_sized_by_spec(family, tiny_dir, tmp_path, tokenizer):
    src = tiny_dir(family)
    out = tmp_path / "hybrid"
    convert(str(src), out, kv_rank="full", rope_dims="all", layers="1", **SMALL)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    conv = kvx.load(str(out))
    plan = Plan.from_config(conv.config)
    assert [type(s) for s in plan.layers] == [FullSpec, MLASpec, FullSpec]
    ids = _ids(tokenizer, n=40, batch=1)
    with torch.no_grad():
        assert_close(conv(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    assert kv_bytes_per_token(conv, ids) == kv_bytes_per_token_spec(conv, ids.shape[-1])
    assert kv_bytes_per_token(base, ids) == kv_bytes_per_token_spec(base, ids.shape[-1])


def test_generate_uses_the_latent_cache(tiny_dir, tmp_path, tokenizer):
    src = tiny_dir("qwen3")
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank=8, rope_dims=8, **SMALL)
    conv = kvx.load(str(out))
    ids = _ids(tokenizer, n=12, batch=1)
    res = conv.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert res.sequences.shape[-1] == 17
    layer = output_cache(res).layers[0]
    assert isinstance(layer, MLACacheLayer) and layer.latent.shape[-2] == 16


def test_2norm_selection_is_per_kv_head():
    from kvx.methods.mla.maths import select_pairs

    score = torch.zeros(2, 8)
    score[0, [1, 6]] = 5.0  # KV head 0 leans on pairs 1 and 6
    score[1, [0, 3]] = 5.0  # KV head 1 on pairs 0 and 3
    assert select_pairs("2norm", 2, 16, 2, score).tolist() == [[1, 6], [0, 3]]
    assert select_pairs("high", 2, 16, 2).tolist() == [[0, 1], [0, 1]]
    assert select_pairs("low", 2, 16, 2).tolist() == [[6, 7], [6, 7]]
    assert select_pairs("uniform", 1, 16, 3).tolist() == [[0, 4, 7]]
