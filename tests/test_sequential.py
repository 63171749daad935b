"""Layer-at-a-time conversion: the same checkpoint as whole-model calibration, output-aware
initialisations that beat the K/V-balanced PCA on what the layer outputs, and layer-wise
fitting that never makes a layer worse."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kvx.arch import get_adapter
from kvx.calibration import collect_stats
from kvx.convert.assemble import assemble, convert_model
from kvx.convert.sequential import FitSettings, sequential_convert
from kvx.plan import MLASpec, Plan

from .conftest import FAMILIES, tiny_model

WINDOWS = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))


def _setup(family):
    base = tiny_model(family)
    adapter = get_adapter(base.config)
    plan = Plan([MLASpec(8, 4 * adapter.n_kv_heads, "2norm")] * adapter.n_layers)
    return base, adapter, plan, {"k_norm_eps": adapter.k_norm_eps()}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_at_a_time_equals_whole_model_calibration(family):
    base, adapter, plan, meta = _setup(family)
    whole, _ = convert_model(base, plan, collect_stats(base, adapter, WINDOWS, list(range(adapter.n_layers))))
    outputs, _ = sequential_convert(base, plan, adapter, WINDOWS, True, meta)
    layered = assemble(base, plan, outputs, adapter, meta)
    for (name, a), (_, b) in zip(whole.state_dict().items(), layered.state_dict().items()):
        assert_close(b, a, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_aware_init_beats_pca_and_fitting_never_hurts(family):
    base, adapter, plan, meta = _setup(family)
    windows = torch.randint(0, 1000, (32, 64), generator=torch.Generator().manual_seed(1))  # 7 batches to fit on
    _, records = sequential_convert(
        base, plan, adapter, windows, True, meta, options={"mla": {"init": "best"}}, fit=FitSettings(steps=60, lr=1e-3)
    )
    pca = sum(r.candidates["pca"] for r in records.values())
    output = sum(min(v for k, v in r.candidates.items() if k.startswith("output")) for r in records.values())
    assert output < pca  # measured on held-out calibration text, in this run
    for r in records.values():
        assert r.error_init == min(r.candidates.values())  # the best candidate is the one kept
        assert r.error_fitted <= r.error_init  # fitting may never make a layer worse
    assert any(r.error_fitted < r.error_init for r in records.values())  # and it does something


def test_converted_inputs_calibrate_on_the_converted_stream():
    """GPTQ-style: from the second layer on, the statistics come from the converted layers' outputs."""
    base, adapter, plan, meta = _setup("llama")
    original, _ = sequential_convert(base, plan, adapter, WINDOWS, True, meta)
    converted, _ = sequential_convert(base, plan, adapter, WINDOWS, True, meta, inputs="converted")
    assert torch.equal(original[0].state["kv_a_proj.weight"], converted[0].state["kv_a_proj.weight"])
    assert not torch.allclose(original[1].state["kv_a_proj.weight"], converted[1].state["kv_a_proj.weight"])
