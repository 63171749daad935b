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

from ..errors import KvxError
from ..measure.metrics import attention_chunks
from ..modeling.kvx_evict import BlockPredictor, pool_blocks
from ..modeling.kvx_specs import EvictSpec

MAX_SAMPLES = 8192  # training samples drawn from the recorded traces (the rest add little)


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
    lr: float = 1e-2,
    seed: int = 0,
    on_step=None,
) -> BlockPredictor:
    """A predictor fitted to ``history [N, steps, blocks] -> target [N, blocks]`` (block masses)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BlockPredictor(history.shape[1])
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


def trace_rows(q: torch.Tensor, k: torch.Tensor, scaling: float, spec: EvictSpec, targets: int):
    """One layer's attention on calibration windows as the predictor sees it: the last
    ``spec.history + targets`` queries' rows, per KV head, pooled into the blocks every target
    may evict (after the sinks, before the last ``local`` tokens of the first target).

    Returns ``(seen, mass)``, each ``[B * H_kv, rows, blocks]``: the max over the head's queries
    and block (the predictor's input, as the cache layer keeps it) and the mean attention mass
    per block (what it must predict); None when the windows are too short."""
    b, h, t, _ = q.shape
    hkv, rows = k.shape[1], spec.history + targets
    n_blocks = (t - targets - spec.local - spec.sink) // spec.block
    if rows > t or n_blocks < 2:
        return None
    probs = torch.cat([p for _, p in attention_chunks(q[:, :, t - rows :], k, scaling)], dim=2)
    probs = probs.reshape(b, hkv, h // hkv, rows, t)
    seen = pool_blocks(probs.amax(2), spec.sink, spec.block, n_blocks)
    mass = pool_blocks(probs.mean(2), spec.sink, spec.block, n_blocks, "sum")
    return seen.flatten(0, 1), mass.flatten(0, 1)


def samples(traces: list, steps: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(history [N, steps, blocks], target [N, blocks])`` pairs drawn from ``traces`` (each a
    ``(seen, mass)`` pair of ``trace_rows``): every target row with the ``steps`` before it, at
    most ``limit`` of them, chosen at random."""
    pairs = [
        (i, n, r)
        for i, (seen, _) in enumerate(traces)
        for n in range(seen.shape[0])
        for r in range(steps, seen.shape[1])
    ]
    pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:limit]
    hist, want = [], []
    for j in pick.tolist():
        i, n, r = pairs[j]
        seen, mass = traces[i]
        hist.append(seen[n, r - steps : r])
        want.append(mass[n, r])
    return torch.stack(hist), torch.stack(want)


def fit_on_traces(train: list, held: list, spec: EvictSpec, steps: int, on_step=None) -> tuple[BlockPredictor, dict]:
    """The predictor trained on ``train`` traces and judged on ``held`` ones against the rules:
    recall at ``k`` (what the budget keeps of the candidate blocks, at most a quarter of them,
    so that the figure is not 1 by construction)."""
    if not train or not held:
        raise KvxError(
            f"the predictor trains on the last {spec.history} + a few attention rows of each calibration window "
            "and is judged on a held-out one: it needs at least two windows longer than "
            f"{spec.history + spec.sink + spec.local + 2 * spec.block} tokens (raise --calib-seq-len or --calib-tokens)"
        )
    history, target = samples(train, spec.history, MAX_SAMPLES, seed=0)
    model = train_predictor(history, target, steps=steps, on_step=on_step)
    h_hist, h_target = samples(held, spec.history, MAX_SAMPLES // 2, seed=1)
    blocks = h_hist.shape[-1]
    k = max(1, min((spec.budget - spec.sink - spec.local) // spec.block, blocks // 4))
    with torch.no_grad():
        scores = {"predictor": model(h_hist), **rule_scores(h_hist)}
    report = {name: round(recall(v, h_target, k), 4) for name, v in scores.items()}
    summary = (
        f"recall of the next step's attention in the top {k} of {blocks} blocks, held-out calibration text: "
        + ", ".join(f"{name} {r:.3f}" for name, r in report.items())
    )
    info = {"recall": report, "k": k, "blocks": blocks, "samples": int(history.shape[0]), "steps": steps}
    return model, {**info, "summary": summary}
