"""Layer-at-a-time conversion: the same checkpoint as whole-model calibration, output-aware
initialisations that beat the K/V-balanced PCA on what the layer outputs, layer-wise fitting
that never makes a layer worse, and a model read a layer at a time from its shards."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.arch import get_adapter
from kvx.calibration import collect_stats
from kvx.convert import convert
from kvx.convert.assemble import convert_model
from kvx.convert.sequential import FitSettings, sequential_convert
from kvx.layerwise import Walker
from kvx.plan import MLASpec, Plan

from .conftest import FAMILIES, tiny_model

WINDOWS = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))


def _setup(family):
    base = tiny_model(family)
    adapter = get_adapter(base.config)
    plan = Plan([MLASpec(8, 4 * adapter.n_kv_heads, "2norm")] * adapter.n_layers)
    return base, adapter, plan, {"k_norm_eps": adapter.k_norm_eps()}


def _walk(base, adapter, plan, meta, windows, **kwargs):
    outputs = {}
    walker = Walker(base, adapter, list(windows.split(4)))
    records = sequential_convert(walker, plan, True, meta, lambda i, out, layer: outputs.__setitem__(i, out), **kwargs)
    return outputs, records


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_at_a_time_equals_whole_model_calibration(family):
    base, adapter, plan, meta = _setup(family)
    whole, reference = convert_model(base, plan, collect_stats(base, adapter, WINDOWS, list(range(adapter.n_layers))))
    outputs, _ = _walk(base, adapter, plan, meta, WINDOWS, options={"mla": {"init": "pca"}})  # the same transform
    for i, out in outputs.items():
        for name, value in out.state.items():
            assert_close(value, reference[i].state[name], atol=1e-5, rtol=0, msg=f"layer {i} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_output_aware_init_beats_pca_and_fitting_never_hurts(family):
    base, adapter, plan, meta = _setup(family)
    windows = torch.randint(0, 1000, (32, 64), generator=torch.Generator().manual_seed(1))  # 7 batches to fit on
    _, records = _walk(
        base, adapter, plan, meta, windows, options={"mla": {"init": "best"}}, fit=FitSettings(steps=60, lr=1e-3)
    )
    pca = sum(r.candidates["pca"] for r in records.values())
    output = sum(min(v for k, v in r.candidates.items() if k.startswith("output")) for r in records.values())
    assert output < pca  # measured on held-out calibration text, in this run
    for r in records.values():
        assert r.error_init == min(r.candidates.values())  # the best candidate is the one kept
        assert r.error_fitted <= r.error_init  # fitting may never make a layer worse
    assert any(r.error_fitted < r.error_init for r in records.values())  # and it does something


def test_fitting_the_queries_too_trains_the_converted_copy_only():
    """``--fit-also q_proj``: the converted layers' queries move, the original model's do not."""
    base, adapter, plan, meta = _setup("llama")
    before = [adapter.attention(base, i).q_proj.weight.clone() for i in range(adapter.n_layers)]
    windows = torch.randint(0, 1000, (16, 64), generator=torch.Generator().manual_seed(2))
    fit = FitSettings(steps=30, lr=1e-3, also=("q_proj",))
    outputs, records = _walk(base, adapter, plan, meta, windows, fit=fit)
    for i, q in enumerate(before):
        assert torch.equal(adapter.attention(base, i).q_proj.weight, q)
        assert records[i].error_fitted <= records[i].error_init
    fitted = [i for i, r in records.items() if r.error_fitted < r.error_init]
    assert fitted and all(not torch.equal(outputs[i].state["q_proj.weight"], before[i]) for i in fitted)


def test_convert_fits_the_queries_by_default_and_none_keeps_them(tiny_dir, tmp_path):
    """The checkpoint carries each fitted layer's own q_proj/o_proj; ``fit_also='none'`` writes the source's."""
    src = tiny_dir("llama")
    options = dict(kv_rank=8, rope_dims=8, calib_tokens=512, calib_seq_len=64, fit_steps=50)
    source = kvx.load_model(str(src))[0].state_dict()
    for given, plan_says in (({}, ["q_proj", "o_proj"]), ({"fit_also": "none"}, [])):
        out = tmp_path / ("none" if given else "default")
        result = convert(str(src), out, **given, **options)
        state = kvx.load(str(out)).state_dict()
        fitted = [i for i, r in result["layers"].items() if r.error_fitted < r.error_init]
        assert fitted
        for i in fitted:
            for name in ("q_proj", "o_proj"):
                key = f"model.layers.{i}.self_attn.{name}.weight"
                assert torch.equal(state[key], source[key]) == (not plan_says), key
        assert result["plan"].meta["conversion"]["fit_also"] == plan_says


def test_converted_inputs_calibrate_on_the_converted_stream():
    """GPTQ-style: from the second layer on, the statistics come from the converted layers' outputs."""
    base, adapter, plan, meta = _setup("llama")
    original, _ = _walk(base, adapter, plan, meta, WINDOWS)
    converted, _ = _walk(base, adapter, plan, meta, WINDOWS, inputs="converted")
    assert torch.equal(original[0].state["kv_a_proj.weight"], converted[0].state["kv_a_proj.weight"])
    assert not torch.allclose(original[1].state["kv_a_proj.weight"], converted[1].state["kv_a_proj.weight"])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_reading_layers_from_shards_gives_the_in_memory_checkpoint(family, tiny_dir, tmp_path):
    """``kvx convert`` of a folder reads one layer at a time; handed the loaded model it converts in
    memory: the two checkpoints are the same."""
    src = tiny_dir(family)
    lazy, loaded = tmp_path / "lazy", tmp_path / "loaded"
    options = dict(kv_rank=8, rope_dims=8 if family == "llama" else 4, calib_tokens=512, calib_seq_len=64)
    convert(str(src), lazy, **options)
    convert(str(src), loaded, loaded=kvx.load_model(str(src)), **options)
    a, b = kvx.load(str(lazy)).state_dict(), kvx.load(str(loaded)).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
