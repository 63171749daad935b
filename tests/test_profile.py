"""kvx profile: metrics on cases with known answers, the model's real attention, and plan -> convert."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import kvx
from kvx.arch import get_adapter
from kvx.convert import convert
from kvx.errors import KvxError
from kvx.measure.attention import cross_scale_similarity
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
from kvx.measure.metrics import attention_chunks, energy_ranks, lazy_mass, topk_recall
from kvx.methods.mla.maths import output_spectrum
from kvx.plan import MLASpec, Plan
from kvx.profile import profile
from kvx.profile.suggest import suggest_condensed, suggest_plan

from .conftest import tiny_model

SMALL = dict(tokens=512, seq_len=128, window=16, topk=4)


def test_attention_on_sinks_only_has_lazy_ratio_one():
    t, d = 64, 8
    q = torch.ones(1, 2, t, d)
    k = torch.zeros(1, 1, t, d)
    k[..., 0, :] = 50.0  # every query puts (numerically) all its mass on key 0, a sink
    masses, n = torch.zeros(2), 0
    for c0, probs in attention_chunks(q, k, 1.0, chunk=16):
        m, c = lazy_mass(probs, c0, sink=4, window=8)
        masses += m
        n += c
    assert n == 1 * (t - 12)
    assert_close(masses / n, torch.ones(2), atol=1e-6, rtol=0)


def test_uniform_attention_lazy_mass_is_the_share_of_kept_keys():
    t = 40
    q, k = torch.zeros(1, 1, t, 4), torch.zeros(1, 1, t, 4)  # all scores equal: uniform rows
    ((c0, probs),) = list(attention_chunks(q, k, 1.0, chunk=t))
    mass, n = lazy_mass(probs, c0, sink=2, window=5)
    expected = sum(7 / (pos + 1) for pos in range(7, t))
    assert n == t - 7
    assert mass.item() == pytest.approx(expected, rel=1e-5)


def test_topk_recall_known_cases():
    t = 20
    q = torch.ones(1, 1, t, 4)
    k = torch.zeros(1, 1, t, 4)
    k[..., :3, :] = torch.tensor([3.0, 2.0, 1.0])[:, None]  # the same three keys dominate every row
    total, count, prev = 0.0, 0, None
    for c0, probs in attention_chunks(q, k, 1.0, chunk=7):
        hits, n, prev = topk_recall(probs, prev, c0, k=3)
        total, count = total + hits.sum().item(), count + n
    assert count == t - 4 and total / count == pytest.approx(1.0)


def test_rank_r_keys_have_all_energy_at_rank_r():
    torch.manual_seed(0)
    r = 5
    w = torch.randn(32, r) @ torch.randn(r, 48)  # a rank-5 K projection
    x = torch.randn(1000, 48)
    evals = output_spectrum(w, x.T @ x / 1000)[0]
    assert evals[:r].sum() / evals.sum() == pytest.approx(1.0, abs=1e-9)
    ranks = energy_ranks(evals)
    assert ranks["rank_99"] <= r and ranks["rank_90"] >= 1 and ranks["dims"] == 32


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_profile_sees_the_models_real_attention(family, tokenizer):
    """Our chunked recomputation equals transformers' own eager attention weights."""
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    a = get_adapter(model.config)
    ids = torch.randint(0, 1000, (1, 40))
    captured = {}
    hooks = [
        a.attention(model, i).register_forward_pre_hook(
            lambda m, args, kw, i=i: captured.__setitem__(i, a.qkv(m, kw["hidden_states"], *kw["position_embeddings"])),
            with_kwargs=True,
        )
        for i in range(a.n_layers)
    ]
    with torch.no_grad():
        eager = model(ids, output_attentions=True).attentions
    for h in hooks:
        h.remove()
    for i in range(a.n_layers):
        q, k, _ = captured[i]
        attn = a.attention(model, i)
        ours = torch.cat([p for _, p in attention_chunks(q, k, attn.scaling, a.sliding_window(i), chunk=16)], dim=-2)
        assert_close(ours, eager[i].float(), atol=1e-5, rtol=0)


def test_identical_models_are_similar_on_the_diagonal(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    report = profile(str(src), tmp_path / "prof", reference=str(src), xscale_tokens=64, **SMALL)
    sims = torch.tensor(report["cross_scale"]["head_averaged"])
    assert_close(sims.diagonal(), torch.ones(3, dtype=sims.dtype), atol=1e-6, rtol=0)
    assert [m["reference_layer"] for m in report["cross_scale"]["best_mapping"]] == [0, 1, 2]
    best = torch.tensor(report["cross_scale"]["best_head"])
    assert_close(best.diagonal(), torch.ones(3, dtype=best.dtype), atol=1e-6, rtol=0)


def test_cross_scale_best_head_picks_the_matching_head():
    torch.manual_seed(0)
    large = torch.rand(2, 3, 50)
    small = large[:, [2, 0, 1]]  # same maps, heads permuted
    sims = cross_scale_similarity(large, small)
    assert_close(sims["best_head"].diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_profile_writes_everything_and_its_plan_converts(tiny_dir, tmp_path):
    src = tiny_dir("qwen3")
    out = tmp_path / "prof"
    report = profile(str(src), out, target_kv_ratio=2.0, **SMALL)
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["layers"]) == 3 and sorted(saved["lazy_ranking"]) == [0, 1, 2]
    for layer in saved["layers"]:
        assert 0 <= layer["lazy_ratio"] <= 1 + 1e-6 and 0 <= layer["topk_recall"] <= 1 + 1e-6
        assert 1 <= layer["spectrum"]["joint"]["rank_95"] <= layer["spectrum"]["joint"]["dims"]
        assert len(layer["rope_pairs_kept"]) == 2  # per KV head
    sim = torch.tensor(saved["cross_layer_similarity"]["k"])
    assert_close(sim.diagonal(), torch.ones(3, dtype=sim.dtype), atol=1e-6, rtol=0)
    for png in ("lazy_ratio.png", "rank95.png", "cross_layer_similarity.png"):
        assert mpimg.imread(out / png).shape[0] > 100
    plan = Plan.load(out / "plan.yaml")
    assert plan.layers == Plan.from_dict(report["suggested_plan"]).layers

    conv_out = tmp_path / "conv"
    convert(str(src), conv_out, plan=out / "plan.yaml", calib_tokens=1024, calib_seq_len=128)
    conv = kvx.load(str(conv_out))
    assert Plan.from_config(conv.config).layers == plan.layers
    ids = torch.randint(0, 1000, (1, 128))
    base = AutoModelForCausalLM.from_pretrained(src)
    measured = kv_bytes_per_token(conv, ids)
    assert measured == kv_bytes_per_token_spec(conv, 128)
    ratio = kv_bytes_per_token(base, ids) / measured
    assert ratio == pytest.approx(report["expected_kv_ratio"], rel=1e-6)
    assert ratio >= 2.0 * 0.95


def test_suggestion_allocates_rank_by_spectrum_and_streams_lazy_layers():
    from kvx.plan import CacheGeometry, StreamingSpec

    geom = CacheGeometry(n_kv_heads=1, head_dim=16)
    steep = torch.tensor([10.0] + [1e-3] * 29)  # one direction carries the energy
    flat = torch.ones(30)
    plan = suggest_plan(geom, [steep, flat], [0.1, 0.1], target_ratio=2.0, rope_dims=4)
    a, b = plan.layers
    assert isinstance(a, MLASpec) and isinstance(b, MLASpec) and b.kv_rank > a.kv_rank
    lazy = suggest_plan(geom, [flat] * 4, [0.95, 0.2, 0.97, 0.5], 2.0, 4, streaming=True, window=60, context=1024)
    assert [isinstance(s, StreamingSpec) for s in lazy.layers] == [True, False, True, False]
    with pytest.raises(KvxError, match="no room"):
        suggest_plan(geom, [flat], [0.1], target_ratio=16.0, rope_dims=2)


def test_streaming_plan_from_profile_converts(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    report = profile(str(src), tmp_path / "prof", streaming=True, lazy_threshold=0.0, **SMALL)
    kinds = [spec["kind"] for spec in report["suggested_plan"]["layers"]]
    assert kinds.count("streaming") == 1  # at most half of 3 layers, the laziest
    laziest = max(range(3), key=lambda i: report["layers"][i]["lazy_ratio"])
    assert kinds[laziest] == "streaming"
    convert(str(src), tmp_path / "out", plan=tmp_path / "prof" / "plan.yaml", calib_tokens=1024, calib_seq_len=128)
    assert (
        Plan.from_config(kvx.load(str(tmp_path / "out")).config).layers
        == Plan.load(tmp_path / "prof" / "plan.yaml").layers
    )


def test_condensed_suggestion_groups_the_most_similar_neighbours():
    from kvx.plan import CacheGeometry, CondensedSpec

    # layers 0-2 alike, 3-5 alike: two groups, each reading its first layer
    sim = [[1.0 if (i < 3) == (j < 3) else 0.1 for j in range(6)] for i in range(6)]
    plan = suggest_condensed(CacheGeometry(n_kv_heads=1, head_dim=16), sim, target_ratio=3.0)
    assert plan.layers == [CondensedSpec(0)] * 3 + [CondensedSpec(3)] * 3
    assert plan.meta["expected_kv_ratio"] == 3.0 and "similarity" in plan.meta["how"]
    # runs never mix local and global layers, even when asked for fewer groups
    geom = CacheGeometry(1, 16, sliding_window=8, layer_types=("sliding_attention",) * 2 + ("full_attention",) * 2)
    mixed = suggest_condensed(geom, [[1.0] * 4] * 4, target_ratio=4.0)
    assert mixed.layers == [CondensedSpec(0)] * 2 + [CondensedSpec(2)] * 2


def test_condensed_plan_from_profile_converts(tiny_dir, tmp_path):
    src = tiny_dir("qwen2")
    report = profile(str(src), tmp_path / "prof", condensed=True, target_kv_ratio=1.5, **SMALL)
    plan = Plan.load(tmp_path / "prof" / "plan.yaml")
    assert [s.kind for s in plan.layers] == ["condensed"] * 3
    assert len({s.source for s in plan.layers}) == 2  # ceil(3 / 1.5) sources
    convert(str(src), tmp_path / "out", plan=tmp_path / "prof" / "plan.yaml", calib="none")
    conv = kvx.load(str(tmp_path / "out"))
    ids = torch.randint(0, 1000, (1, 64))
    ratio = kv_bytes_per_token(AutoModelForCausalLM.from_pretrained(src), ids) / kv_bytes_per_token(conv, ids)
    assert ratio == pytest.approx(report["expected_kv_ratio"]) == pytest.approx(1.5)


def test_reference_with_another_tokenizer_is_refused(tiny_dir, tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    src = tiny_dir("llama")
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    changed = AutoTokenizer.from_pretrained(smollm2_dir)
    changed.add_tokens(["<kvx-extra-token>"])
    changed.save_pretrained(other)
    with pytest.raises(KvxError, match="another tokenizer"):
        profile(str(src), tmp_path / "prof", reference=str(other), **SMALL)
    assert not (tmp_path / "prof").exists()
