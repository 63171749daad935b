"""The block predictor learns what eviction needs: which blocks the next step will attend to."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import kvx
from kvx.convert import convert
from kvx.errors import KvxError
from kvx.loading import load_model
from kvx.measure.kv import checked_nbytes
from kvx.methods.evict_train import recall, rule_scores, train_predictor
from kvx.modeling.kvx_evict import PREDICTOR, BlockPredictor, initial_predictor
from kvx.plan import EvictSpec, FullSpec, Plan

from .test_evict import IDS, _decode


def _intermittent(n: int, seed: int, steps: int = 16, blocks: int = 32, hot: int = 4):
    """Histories where ``hot`` blocks (a different set per example) are each attended at random
    half of the steps, over a faint background: the next step attends to a random half of them.
    The previous step alone sees only half of the hot blocks; the pattern over time shows all."""
    g = torch.Generator().manual_seed(seed)
    hot_sets = torch.rand(n, blocks, generator=g).argsort(-1)[:, :hot]
    on = torch.zeros(n, steps + 1, blocks)
    on.scatter_(
        2, hot_sets[:, None].expand(-1, steps + 1, -1), (torch.rand(n, steps + 1, hot, generator=g) < 0.5).float()
    )
    att = on + 0.05 * torch.rand(n, steps + 1, blocks, generator=g)
    return att[:, :steps], att[:, steps]


def test_a_trained_predictor_beats_constant_and_previous_step_rules():
    history, target = _intermittent(2048, seed=0)
    held_h, held_t = _intermittent(512, seed=1)
    model = train_predictor(history, target, steps=300)
    with torch.no_grad():
        trained = recall(model(held_h), held_t, k=4)
        constant = recall(torch.zeros_like(held_t), held_t, k=4)  # no information: ties
    previous = recall(rule_scores(held_h)["previous step"], held_t, k=4)
    assert trained > previous + 0.1, (trained, previous)
    assert trained > constant + 0.3, (trained, constant)


def test_the_predictor_is_a_few_kilobytes_and_any_number_of_blocks_wide():
    model = BlockPredictor()
    assert sum(p.numel() for p in model.parameters()) * 4 < 22 * 1024
    assert model(torch.rand(3, 64, 50)).shape == (3, 50)
    assert BlockPredictor(8)(torch.rand(2, 8, 7)).shape == (2, 7)


# -- the predictor policy: trained at conversion, carried by the checkpoint, deciding the evictions

PREDICTED = "evict(budget=32, sink=4, local=8, block=4, policy=predictor, history=8)"


@pytest.fixture(scope="module")
def predicted(tiny_dir_factory, tmp_path_factory):
    """A tiny llama converted with the predictor policy on the bundled calibration text."""
    out = tmp_path_factory.mktemp("predicted") / "out"
    result = convert(
        str(tiny_dir_factory("llama")),
        out,
        to=PREDICTED,
        calib="bundled",
        calib_tokens=1024,
        calib_seq_len=128,
        predictor_steps=40,
    )
    return out, result


def test_conversion_trains_the_predictor_and_the_checkpoint_carries_it(predicted):
    out, result = predicted
    report = result["plan"].meta["conversion"]["predictor"]
    assert set(report["recall"]) == {"predictor", "previous step", "history mean"}
    assert all(0.0 < r <= 1.0 for r in report["recall"].values())
    assert report["k"] < report["blocks"] and report["samples"] > 0  # recall is not 1 by construction
    stored = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            stored |= {k[len(PREDICTOR) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(PREDICTOR + ".")}
    assert 0 < sum(t.numel() * t.element_size() for t in stored.values()) < 32_000  # a few KB
    model = kvx.load(str(out))
    shared = getattr(model, PREDICTOR)
    assert all(torch.equal(shared.state_dict()[k], v.to(shared.state_dict()[k].dtype)) for k, v in stored.items())
    assert all(layer.self_attn.predictor is shared for layer in model.model.layers)  # one per model
    init = initial_predictor(8)
    assert any(not torch.equal(init.state_dict()[k], v) for k, v in stored.items())  # trained, not the init


def test_the_predictor_decides_what_stays_within_the_budget(predicted):
    out, _ = predicted
    model = kvx.load(str(out))
    _, cache = _decode(model, IDS, 50)
    checked_nbytes(model, cache, IDS.shape[-1])  # measured bytes == the plan's
    assert all(layer.keys.shape[-2] == 32 for layer in cache.layers)
    _, again = _decode(model, IDS, 50)
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(cache.layers, again.layers))  # deterministic
    with torch.no_grad():
        getattr(model, PREDICTOR).head.bias.zero_()
        getattr(model, PREDICTOR).head.weight.neg_()  # the opposite ranking
    _, flipped = _decode(model, IDS, 50)
    assert any(not torch.equal(a.pos, b.pos) for a, b in zip(cache.layers, flipped.layers))


def test_the_predictor_policy_needs_calibration_text(tiny_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KvxError, match="calibration text") as e:
        convert(str(tiny_dir("llama")), out, to=PREDICTED, calib="none")
    assert "\n" not in str(e.value) and not out.exists()


@pytest.mark.parametrize(
    "layers, options, message",
    [
        ((8, 16), {}, "share one predictor"),  # two histories cannot share one predictor
        ((8, 8), {"predictor_steps": 0}, "predictor_steps"),
    ],
)
def test_predictor_plans_that_cannot_work_are_refused_before_any_work(tiny_dir, tmp_path, layers, options, message):
    specs = [EvictSpec(32, 4, 8, 4, "predictor", history=h) for h in layers]
    out = tmp_path / "out"
    with pytest.raises(KvxError, match=message) as e:
        convert(str(tiny_dir("llama")), out, plan=Plan([FullSpec(), *specs]), calib="bundled", **options)
    assert "\n" not in str(e.value) and not out.exists()


def test_a_bfloat16_model_runs_its_predictor_in_bfloat16(predicted):
    out, _ = predicted
    model = load_model(str(out), dtype=torch.bfloat16, need_tokenizer=False)[0]
    assert getattr(model, PREDICTOR).head.weight.dtype == torch.bfloat16
    got, cache = _decode(model, IDS, 50)
    assert torch.isfinite(got.float()).all()
    assert all(layer.keys.shape[-2] == 32 for layer in cache.layers)
