"""Streaming layers: exact below sinks + window, a cache that stops growing, hybrids that load anywhere."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import kvx
from kvx.convert import convert
from kvx.convert.config import layer_fraction, top_layers
from kvx.errors import KvxError
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.methods import get_method
from kvx.modeling.kvx_common import cache_kwargs, output_cache
from kvx.modeling.kvx_mla import MLAAttention
from kvx.modeling.kvx_streaming import StreamingAttention, StreamingCacheLayer
from kvx.plan import FullSpec, MLASpec, Plan, StreamingSpec

from .helpers import reload_without_kvx

# Runtime behaviour: run again under the oldest transformers of the declared range (.ci/run).
pytestmark = pytest.mark.runtime


def _reference_streaming(base, ids, sink, window, layers):
    """The base model with each streaming layer's attention restricted by an explicit mask:
    an independent implementation of the rule (keys j <= p with j < sink or j >= p - window)."""
    from kvx.arch import get_adapter
    from kvx.modeling.kvx_common import project_qkv

    a = get_adapter(base.config)
    t = ids.shape[-1]
    p = torch.arange(t)
    allowed = (p[None] <= p[:, None]) & ((p[None] < sink) | (p[None] >= p[:, None] - window))

    def forward_for(attn):
        def forward(hidden_states, position_embeddings=None, **kwargs):
            q, k, v = project_qkv(
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                a.q_norm(attn),
                a.k_norm(attn),
                hidden_states,
                *position_embeddings,
                a.n_heads,
                a.n_kv_heads,
                a.head_dim,
            )
            g = a.n_heads // a.n_kv_heads
            scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * attn.scaling
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out = (probs @ v.repeat_interleave(g, 1)).transpose(1, 2).reshape(*hidden_states.shape[:2], -1)
            return attn.o_proj(out), None

        return forward

    originals = {}
    for i in layers:
        attn = a.attention(base, i)
        originals[i] = attn.forward
        attn.forward = forward_for(attn)
    try:
        with torch.no_grad():
            return base(ids, use_cache=False).logits
    finally:
        for i, f in originals.items():
            a.attention(base, i).forward = f


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_short_sequences_are_exact_and_long_ones_follow_the_window_rule(family, tiny_dir, tmp_path):
    src = tiny_dir(family)
    out = tmp_path / "stream"
    convert(str(src), out, to="streaming", layers="0,2", sink=2, window=12)
    conv = kvx.load(str(out))
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    assert isinstance(conv.model.layers[0].self_attn, StreamingAttention)
    short = torch.randint(0, 1000, (2, 15))  # 15 = sink + window + 1: every query sees everything
    with torch.no_grad():
        assert_close(conv(short).logits, base(short).logits, atol=1e-5, rtol=0)
    long = torch.randint(0, 1000, (1, 80))
    StreamingAttention.chunk = 16  # several chunks, so the chunked prefill is exercised
    try:
        with torch.no_grad():
            got = conv(long).logits
    finally:
        StreamingAttention.chunk = 512
    assert_close(got, _reference_streaming(base, long, 2, 12, [0, 2]), atol=1e-5, rtol=0)
    assert (got - base(long).logits).abs().max() > 1e-3  # the window really cut something


def test_cache_stops_growing_and_decoding_matches_prefill(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "stream"
    convert(str(src), out, to="streaming", layers="1", sink=3, window=10)
    conv = kvx.load(str(out))
    ids = torch.randint(0, 1000, (1, 40))
    cache = new_cache(conv)
    with torch.no_grad():
        conv(ids[:, :5], **cache_kwargs(conv, cache))
        steps = [conv(ids[:, t : t + 1], **cache_kwargs(conv, cache)).logits[:, -1] for t in range(5, 40)]
        full = conv(ids, use_cache=False).logits[:, 5:]
    assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=0)
    layer = cache.layers[1]
    assert isinstance(layer, StreamingCacheLayer)
    assert layer.keys.shape[-2] == 13 and layer.positions.tolist() == [0, 1, 2] + list(range(30, 40))
    assert cache.layers[0].keys.shape[-2] == 40
    res = conv.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert output_cache(res).layers[1].keys.shape[-2] == 13
    assert output_cache(res).get_seq_length() == 47
    assert kv_bytes_per_token(conv, ids) == kv_bytes_per_token_spec(conv, 40)


def test_hybrid_plan_converts_reloads_without_kvx_and_generates(tiny_dir, tmp_path, tokenizer):
    src = tiny_dir("qwen2")
    plan = Plan([MLASpec(16, 8, "high"), StreamingSpec(2, 8), FullSpec()])
    out = tmp_path / "hybrid"
    convert(str(src), out, plan=plan, calib_tokens=1024, calib_seq_len=128)
    conv = kvx.load(str(out))
    assert [type(layer.self_attn).__name__ for layer in conv.model.layers] == [
        "MLAAttention",
        "StreamingAttention",
        "Qwen2Attention",
    ]
    ids = tokenizer("And it came to pass in those days, that there went out a decree", return_tensors="pt").input_ids
    assert kv_bytes_per_token(conv, ids) == kv_bytes_per_token_spec(conv, ids.shape[-1])
    local = conv.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    got = reload_without_kvx(out, ids)
    assert got["kvx_imported"] is False and got["tokens"] == local
    assert got["cache_layers"] == ["MLACacheLayer", "StreamingCacheLayer", "DynamicLayer"]
    assert isinstance(conv.model.layers[0].self_attn, MLAAttention)


def test_auto_picks_the_laziest_layers(tiny_dir, tmp_path):
    streaming = get_method("streaming")
    assert layer_fraction("auto", streaming) == layer_fraction(None, streaming) == 0.5
    assert layer_fraction("0,2", streaming) is None and layer_fraction("0.25", streaming) == 0.25
    assert top_layers([0.1, 0.9, 0.5, 0.95], 0.5) == [1, 3]
    assert top_layers([0.1, 0.9, 0.5, 0.95], 0.25) == [3]
    with pytest.raises(KvxError, match="no layer score"):
        layer_fraction("auto", get_method("mla"))
    out = tmp_path / "auto"
    convert(str(tiny_dir("llama")), out, to="streaming", layers="auto", sink=2, window=30)
    plan = Plan.from_config(kvx.load(str(out)).config)
    lazy = plan.meta["lazy_ratio"]
    streaming = [i for i, s in enumerate(plan.layers) if isinstance(s, StreamingSpec)]
    assert len(streaming) == 2 and min(lazy[i] for i in streaming) >= max(
        lazy[i] for i in range(3) if i not in streaming
    )


def test_auto_picks_only_among_layers_that_can_stream(tiny_dir, tmp_path):
    """Gemma 3's local-window layers cannot be streaming: ``auto`` chooses among the others."""
    out = tmp_path / "auto"
    convert(str(tiny_dir("gemma3")), out, to="streaming", layers="auto", sink=2, window=8)
    plan = Plan.from_config(kvx.load(str(out)).config)
    assert [s.kind for s in plan.layers] == ["full", "streaming", "full"]  # layers 0 and 2 are sliding
    with pytest.raises(KvxError, match="sink >= 0"):  # refused before the lazy-ratio measurement
        convert(str(tiny_dir("llama")), tmp_path / "bad", to="streaming", layers="auto", sink=-1, window=8)


def test_streaming_refused_on_local_window_layers(tiny_dir, tmp_path):
    with pytest.raises(KvxError, match="already attends to a local window"):
        convert(str(tiny_dir("gemma3")), tmp_path / "out", to="streaming", layers="0", sink=2, window=8)
    assert not (tmp_path / "out").exists()


def test_eval_long_context_reports_tail_perplexity_and_capped_cache(tiny_dir, tmp_path):
    from kvx.eval import evaluate

    src = tiny_dir("llama")
    out = tmp_path / "stream"
    convert(str(src), out, to="streaming", layers="0,2", sink=2, window=12)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, word in enumerate(("alpha beta gamma delta ", "one two three four five ")):
        (docs / f"{i}.txt").write_text(word * 60)
    (docs / "short.txt").write_text("too short")
    result = evaluate(
        str(out), str(src), data=str(docs), max_tokens=256, seq_len=64, long=[200], long_tail=50, long_docs=5
    )
    row, base = result["model"]["long"]["200"], result["baseline"]["long"]["200"]
    assert row["docs"] == base["docs"] == 2 and row["tail"] == 50
    assert row["kv_bytes_per_token"] == row["kv_bytes_per_token_spec"]
    full_layer = 2 * 2 * 16 * 4  # bytes per token of one full layer (float32)
    assert base["kv_bytes_per_token"] == 3 * full_layer
    assert row["kv_bytes_per_token"] == pytest.approx((full_layer * 200 + 2 * full_layer * 14) / 200)
    assert result["long_context"]["200"]["kv_ratio"] == pytest.approx(
        base["kv_bytes_per_token"] / row["kv_bytes_per_token"]
    )
    assert row["ppl_tail"] > 1 and base["ppl_tail"] > 1
    with pytest.raises(KvxError, match="has 510 tokens"):
        evaluate(str(out), None, data=str(docs), max_tokens=256, seq_len=64, long=[510], long_tail=50)
    with pytest.raises(KvxError, match="exceeds"):
        evaluate(str(out), None, data=str(docs), max_tokens=256, seq_len=64, long=[5000], long_tail=50)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_native_sliding_export_matches_kvx_runtime(family, tiny_dir, tmp_path):
    src = tiny_dir(family)
    out = tmp_path / "stream"
    result = convert(str(src), out, to="streaming", layers="0,2", sink=0, window=12, export="native")
    native = AutoModelForCausalLM.from_pretrained(result["native"]).eval()  # no remote code
    assert native.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    conv = kvx.load(str(out))
    ids = torch.randint(0, 1000, (1, 50))
    with torch.no_grad():
        assert_close(native(ids).logits, conv(ids).logits, atol=1e-5, rtol=0)
        assert (conv(ids).logits - AutoModelForCausalLM.from_pretrained(src)(ids).logits).abs().max() > 1e-3


def test_native_export_refuses_what_it_cannot_express(tiny_dir, tmp_path):
    with pytest.raises(KvxError, match="no sinks"):
        convert(str(tiny_dir("qwen3")), tmp_path / "a", to="streaming", layers="0", sink=4, window=12, export="native")
    with pytest.raises(KvxError, match="no native per-layer sliding-window config"):
        convert(str(tiny_dir("llama")), tmp_path / "b", to="streaming", layers="0", sink=0, window=12, export="native")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
