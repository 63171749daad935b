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
    qq: torch.Tensor | None = None  # sum of q q^T over tokens and the query heads of each KV head, [n_kv, hd, hd]

    @property
    def covariance(self) -> torch.Tensor:
        return self.xx / max(self.n_tokens, 1)

    @property
    def query_covariance(self) -> torch.Tensor | None:
        """Per KV head, the second moment of its query heads' queries (normed, before RoPE)."""
        return None if self.qq is None else self.qq / max(self.n_tokens, 1)


def new_stats(hidden: int) -> LayerStats:
    return LayerStats(torch.zeros(hidden, hidden, dtype=torch.float64), 0, None)


def _heads(y: torch.Tensor, n_heads: int, head_dim: int, norm) -> torch.Tensor:
    """``[N, heads*hd]`` projections -> ``[N, heads, hd]``, per-head norm applied (as the model does)."""
    y = y.view(y.shape[0], n_heads, head_dim)
    return norm(y) if norm is not None else y


def _pair_norms(y: torch.Tensor) -> torch.Tensor:
    """``[N, heads, hd]`` -> per-head pair norms ``[N, heads, hd/2]`` (RoPE keeps them)."""
    half = y.shape[-1] // 2
    return torch.sqrt(y[..., :half].float() ** 2 + y[..., half:].float() ** 2)


@torch.no_grad()
def accumulate(st: LayerStats, attn, x: torch.Tensor, adapter: ArchAdapter, queries: bool = True) -> None:
    """Fold one batch of an attention layer's input ``x`` into ``st``: input second moment, and
    (``queries``) the 2-norm pair scores and the per-KV-head query second moment."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    st.xx += x2.double().T @ x2.double()
    st.n_tokens += x2.shape[0]
    if not queries:
        return
    a = adapter
    q = _heads(attn.q_proj(x2), a.n_heads, a.head_dim, a.q_norm(attn))
    k = _heads(attn.k_proj(x2), a.n_kv_heads, a.head_dim, a.k_norm(attn))
    group = a.n_heads // a.n_kv_heads
    qn = _pair_norms(q).view(q.shape[0], a.n_kv_heads, group, -1)
    score = (qn * _pair_norms(k)[:, :, None]).sum(dim=(0, 2)).double()
    # query head h reads KV head h // group: per KV head, all its queries as rows, then q^T q
    qg = (
        q.float()
        .view(q.shape[0], a.n_kv_heads, group, a.head_dim)
        .permute(1, 0, 2, 3)
        .reshape(a.n_kv_heads, -1, a.head_dim)
    )
    qq = torch.bmm(qg.transpose(1, 2), qg).double()
    st.pair_score = score if st.pair_score is None else st.pair_score + score
    st.qq = qq if st.qq is None else st.qq + qq


class StatsCollector:
    """Hooks the chosen layers of ``model``; ``stats`` holds the running sums."""

    def __init__(self, model, adapter: ArchAdapter, layers: list[int], pair_scores: bool = True):
        self.adapter, self.pair_scores = adapter, pair_scores
        self.stats = {i: new_stats(model.config.hidden_size) for i in layers}
        self.handles = [
            adapter.attention(model, i).register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in layers
        ]

    def _hook(self, idx: int) -> Callable:
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            accumulate(self.stats[idx], module, x, self.adapter, self.pair_scores)

        return hook

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
