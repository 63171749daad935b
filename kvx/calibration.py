"""Calibration: run the model on real text and keep running statistics per attention layer.

Forward pre-hooks see each attention layer's input ``x``; we accumulate ``sum x x^T``
(from which any projection's output covariance follows) and the MHA2MLA 2-norm score
``sum ||q_pair|| * ||k_pair||`` per KV head and frequency pair. Activations are dropped
as soon as they are folded in, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .arch import ArchAdapter


@dataclass
class LayerStats:
    """Calibration statistics of one attention layer's input (running sums, never activations)."""

    xx: torch.Tensor  # sum of x x^T, [hidden, hidden], float64
    n_tokens: int
    pair_score: torch.Tensor | None  # sum over tokens of ||q_pair|| * ||k_pair||, [n_kv, head_dim/2]

    @property
    def covariance(self) -> torch.Tensor:
        return self.xx / max(self.n_tokens, 1)


def _pair_norms(x: torch.Tensor, n_heads: int, head_dim: int, norm) -> torch.Tensor:
    """``[N, heads*hd]`` projections -> per-head pair norms ``[N, heads, hd/2]`` (RoPE keeps them)."""
    y = x.view(x.shape[0], n_heads, head_dim)
    if norm is not None:
        y = norm(y)
    half = head_dim // 2
    return torch.sqrt(y[..., :half].float() ** 2 + y[..., half:].float() ** 2)


class StatsCollector:
    """Hooks the chosen layers of ``model``; ``stats`` holds the running sums."""

    def __init__(self, model, adapter: ArchAdapter, layers: list[int], pair_scores: bool = True):
        self.adapter, self.pair_scores = adapter, pair_scores
        hidden = model.config.hidden_size
        self.stats = {i: LayerStats(torch.zeros(hidden, hidden, dtype=torch.float64), 0, None) for i in layers}
        self.handles = [
            adapter.attention(model, i).register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in layers
        ]

    def _hook(self, idx: int) -> Callable:
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x2 = x.detach().reshape(-1, x.shape[-1])
            st = self.stats[idx]
            st.xx += x2.double().T @ x2.double()
            st.n_tokens += x2.shape[0]
            if self.pair_scores:
                st.pair_score = self._score(module, x2) + (0 if st.pair_score is None else st.pair_score)

        return hook

    @torch.no_grad()
    def _score(self, attn, x2: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        qn = _pair_norms(attn.q_proj(x2), a.n_heads, a.head_dim, a.q_norm(attn))
        kn = _pair_norms(attn.k_proj(x2), a.n_kv_heads, a.head_dim, a.k_norm(attn))
        group = a.n_heads // a.n_kv_heads
        qn = qn.view(qn.shape[0], a.n_kv_heads, group, -1)
        return (qn * kn[:, :, None]).sum(dim=(0, 2)).double()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_stats(
    model,
    adapter: ArchAdapter,
    windows: torch.Tensor,
    layers: list[int],
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, LayerStats]:
    """Run ``windows`` ([n, seq_len] token ids) through the model in batches and return the stats."""
    collector = StatsCollector(model, adapter, layers)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(model.device)
            model.get_decoder()(input_ids=batch, use_cache=False)  # hooks see all; logits are not needed
            if on_batch:
                on_batch(batch.numel())
    finally:
        collector.close()
    return collector.stats
