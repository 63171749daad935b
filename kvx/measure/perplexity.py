"""Perplexity on fixed non-overlapping windows (the same windows for every model in a table)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int], None] | None = None
) -> float:
    """exp(mean next-token NLL) over every predicted position of ``windows`` ([n, seq_len])."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(model.device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
        if on_batch:
            on_batch(batch.numel())
    return math.exp(total_nll / total_tokens)
