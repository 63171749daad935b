"""Budget allocation by measured sensitivity: the sweep's nested latents are the real conversions,
the allocation is the best one under the budget, and the profile's sensitivity plan converts to the
cache it promises."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import kvx
from kvx.arch import get_adapter
from kvx.calibration import collect_stats
from kvx.convert import convert
from kvx.data import token_windows
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
from kvx.methods import LayerInput, method_of
from kvx.plan import CacheGeometry, FullSpec, MLASpec, Plan
from kvx.profile import profile
from kvx.profile.sensitivity import LayerCurve, _interpolated, allocate

from .conftest import FAMILIES, tiny_model

SMALL = dict(tokens=512, seq_len=128, window=16, topk=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_nested_ranks_are_the_conversions_at_those_ranks(family, tokenizer):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = token_windows(tokenizer, "bundled", "calib", 512, 128)
    stats = collect_stats(model, adapter, ids, [1])[1]
    layer = LayerInput.read(adapter, model, 1, stats, {"init": "pca"})
    rope = 2 * adapter.n_kv_heads
    top = MLASpec(20, rope, "2norm")
    nested = method_of(top).nested_ranks(top, layer, [3, 9, 20])
    for rank, state in nested.items():
        spec = MLASpec(rank, rope, "2norm")
        direct = method_of(spec).convert_layer(spec, layer).state
        assert direct.keys() == state.keys()
        for name in direct:
            assert_close(state[name], direct[name], atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {name}")


def _total(curves, specs):
    return sum(
        0.0 if isinstance(s, FullSpec) else _interpolated(c.scores[s.rope_dims])[s.kv_rank]
        for c, s in zip(curves, specs)
    )


def test_allocation_is_the_best_under_the_budget():
    geom = CacheGeometry(n_kv_heads=1, head_dim=16)  # full layer: 32 floats
    ranks = [1, 2, 4, 8, 16]
    curves = [  # a layer whose error falls fast with rank, one that is barely sensitive, one in between
        LayerCurve({4: {r: 1.0 / r**3 for r in ranks}, 8: {r: 0.5 / r**3 for r in ranks}}),
        LayerCurve({4: {r: 1e-3 / r for r in ranks}, 8: {r: 0.9e-3 / r for r in ranks}}),
        LayerCurve({4: {r: 0.1 / r**2 for r in ranks}, 8: {r: 0.05 / r**2 for r in ranks}}),
    ]
    budget = 36
    specs = allocate(curves, geom, budget)
    cost = sum(32 if isinstance(s, FullSpec) else s.kv_rank + s.rope_dims for s in specs)
    assert cost <= budget
    # brute force over every choice the allocation may make (full, or any interpolated rank at each rope)
    options = []
    for c in curves:
        opts = [(32, 0.0)] + [
            (r + rope, s) for rope, m in c.scores.items() for r, s in _interpolated(m).items() if r + rope < 32
        ]
        options.append(opts)
    best = min(sum(s for _, s in combo) for combo in itertools.product(*options) if sum(c for c, _ in combo) <= budget)
    assert _total(curves, specs) == pytest.approx(best, rel=1e-9)
    uniform = [MLASpec(8, 4)] * 3  # the same total cost, spread evenly
    assert _total(curves, specs) < _total(curves, uniform)
    assert specs[1].kv_rank < specs[0].kv_rank  # the insensitive layer gives its floats away
    assert isinstance(allocate(curves, geom, 200)[0], FullSpec)  # room for everything: keep layers whole
    with pytest.raises(kvx.errors.KvxError, match="no per-layer sizes fit"):
        allocate(curves, geom, 10)


@pytest.mark.parametrize(("family", "score"), [("llama", "output"), ("qwen3", "loss"), ("gemma3", "loss")])
def test_sensitivity_plan_converts_to_the_cache_it_promises(family, score, tiny_dir, tmp_path):
    src = tiny_dir(family)
    out = tmp_path / "prof"
    report = profile(str(src), out, target_kv_ratio=2.0, allocate=score, **SMALL)
    assert report["suggested_plan"]["allocation"] == score
    for layer in report["layers"]:
        for scores in layer["sensitivity"].values():
            by_rank = [s for _, s in sorted((int(r), s) for r, s in scores.items())]
            assert all(s >= 0 for s in by_rank) and by_rank[-1] < by_rank[0]  # more latent, less error
    plan = Plan.load(out / "plan.yaml")
    conv_out = tmp_path / "conv"
    convert(str(src), conv_out, plan=out / "plan.yaml", calib_tokens=1024, calib_seq_len=128)
    conv = kvx.load(str(conv_out))
    assert Plan.from_config(conv.config).layers == plan.layers
    ids = torch.randint(0, 1000, (1, 128))
    measured = kv_bytes_per_token(conv, ids)
    assert measured == kv_bytes_per_token_spec(conv, 128)
    ratio = kv_bytes_per_token(AutoModelForCausalLM.from_pretrained(src), ids) / measured
    assert ratio == pytest.approx(report["expected_kv_ratio"], rel=1e-3) and ratio >= 2.0 * 0.99  # rounded to 3 places


def test_unknown_allocation_is_refused_before_any_work(tiny_dir, tmp_path):
    with pytest.raises(kvx.errors.KvxError, match="--allocate"):
        profile(str(tiny_dir("llama")), tmp_path / "prof", allocate="magic", **SMALL)
    assert not (tmp_path / "prof").exists()
