"""Training AttentionPredictor's block predictor, and judging it by what eviction needs.

The published code ships a weights file and no training; this is kvx's. The loss is the
cross-entropy between the predicted block distribution and the next step's attention mass
per block: a block's weight in the loss is the attention it will receive, so a mistake on a
block that carries much of the next step's attention costs much and one on a block nobody
reads costs nothing, which is what keeping the top blocks of a budget needs (a plain
regression would spend its capacity on the many near-zero blocks). AdamW, cosine decay.
The judgement is ``recall``: the share of the next step's block mass inside the ``k`` blocks
chosen, for the predictor against the untrained rules (the previous step's attention, the
mean over the history).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..modeling.kvx_evict import BlockPredictor


def recall(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Mean share of ``target``'s mass ``[N, blocks]`` in the top-``k`` blocks of ``scores``."""
    top = scores.topk(k, dim=-1).indices
    mass = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    return mass.gather(-1, top).sum(-1).mean().item()


def rule_scores(history: torch.Tensor) -> dict[str, torch.Tensor]:
    """The untrained rules' block scores from a history ``[N, steps, blocks]``."""
    return {"previous step": history[:, -1], "history mean": history.mean(1)}


def train_predictor(
    history: torch.Tensor,
    target: torch.Tensor,
    steps: int = 300,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step=None,
) -> BlockPredictor:
    """A predictor fitted to ``history [N, steps, blocks] -> target [N, blocks]`` (block masses)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BlockPredictor()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    want = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    for _ in range(steps):
        idx = torch.randint(0, history.shape[0], (min(batch, history.shape[0]),), generator=gen)
        loss = -(want[idx] * F.log_softmax(model(history[idx]), dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(1)
    return model.eval()
