"""The block predictor learns what eviction needs: which blocks the next step will attend to."""

from __future__ import annotations

import torch

from kvx.methods.evict_train import recall, rule_scores, train_predictor
from kvx.modeling.kvx_evict import BlockPredictor


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
        constant = recall(BlockPredictor()(held_h) * 0, held_t, k=4)  # no information: ties
    previous = recall(rule_scores(held_h)["previous step"], held_t, k=4)
    assert trained > previous + 0.1, (trained, previous)
    assert trained > constant + 0.3, (trained, constant)


def test_the_predictor_is_a_few_kilobytes_and_size_agnostic():
    model = BlockPredictor()
    assert sum(p.numel() for p in model.parameters()) * 4 < 22 * 1024
    assert model(torch.rand(3, 64, 50)).shape == (3, 50)
    assert model(torch.rand(2, 8, 7)).shape == (2, 7)
