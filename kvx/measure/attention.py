"""Forward hooks that profile every attention layer on real text with running statistics.

Each hook recomputes the layer's own q/k/v from its input (through the arch adapter, so
q/k norms, RoPE, GQA, the softmax scale and local windows are the model's), then walks the
attention a chunk of queries at a time. Nothing is kept across batches but sums, except the
small head-level maps of the optional cross-scale pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..arch import ArchAdapter
from ..calibration import StatsCollector
from .metrics import attention_chunks, cosine_matrix, lazy_mass, topk_recall


@dataclass
class LayerProfile:
    lazy_sum: torch.Tensor
    recall_sum: torch.Tensor
    lazy_n: int = 0
    recall_n: int = 0

    @property
    def lazy_per_head(self) -> torch.Tensor:
        return self.lazy_sum / max(self.lazy_n, 1)

    @property
    def recall_per_head(self) -> torch.Tensor:
        return self.recall_sum / max(self.recall_n, 1)


@dataclass
class ProfileSettings:
    sink: int = 4
    window: int = 128
    topk: int = 16
    chunk: int = 256


@dataclass
class ProfileCollector:
    """Hooks all attention layers; after the run, ``layers``, ``kv_sim`` and ``stats`` hold the results."""

    model: torch.nn.Module
    adapter: ArchAdapter
    settings: ProfileSettings
    layers: dict[int, LayerProfile] = field(default_factory=dict)
    kv_sim: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_sim_n: int = 0

    def __post_init__(self):
        a = self.adapter
        self.stats_collector = StatsCollector(self.model, a, list(range(a.n_layers)))
        self.layers = {
            i: LayerProfile(torch.zeros(a.n_heads, dtype=torch.float64), torch.zeros(a.n_heads, dtype=torch.float64))
            for i in range(a.n_layers)
        }
        self._batch_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [
            a.attention(self.model, i).register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i in range(a.n_layers)
        ]

    @property
    def stats(self):
        return self.stats_collector.stats

    def _hook(self, idx: int) -> Callable:
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                self._profile_layer(idx, module, x, cos, sin)

        return hook

    def _profile_layer(self, idx, attn, x, cos, sin) -> None:
        s, a, lp = self.settings, self.adapter, self.layers[idx]
        q, k, v = a.qkv(attn, x, cos, sin)
        prev = None
        for c0, probs in attention_chunks(q, k, float(attn.scaling), a.sliding_window(idx), s.chunk):
            mass, n = lazy_mass(probs, c0, s.sink, s.window)
            lp.lazy_sum += mass.double()
            lp.lazy_n += n
            hits, n, prev = topk_recall(probs, prev, c0, s.topk)
            lp.recall_sum += hits.double()
            lp.recall_n += n
        flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1] * t.shape[-1]).float()  # noqa: E731
        self._batch_kv[idx] = (flat(k), flat(v))

    def end_batch(self) -> None:
        """Fold the batch's cached K/V of all layers into the cross-layer cosine sums."""
        if not self._batch_kv:
            return
        order = sorted(self._batch_kv)
        for j, name in enumerate(("k", "v")):
            vecs = torch.nn.functional.normalize(torch.stack([self._batch_kv[i][j] for i in order]).double(), dim=-1)
            sims = torch.einsum("lnd,mnd->lm", vecs, vecs)
            self.kv_sim[name] = self.kv_sim.get(name, 0) + sims
        self.kv_sim_n += vecs.shape[1]
        self._batch_kv.clear()

    def close(self) -> None:
        self.stats_collector.close()
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_profile(model, adapter, windows, settings, batch_size=1, on_batch=None) -> ProfileCollector:
    """Profile ``windows`` ([n, T] token ids) batch by batch."""
    collector = ProfileCollector(model, adapter, settings)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(model.device)
            model.get_decoder()(input_ids=batch, use_cache=False)
            collector.end_batch()
            if on_batch:
                on_batch(batch.numel())
    finally:
        collector.close()
    return collector


@torch.no_grad()
def attention_maps(model, adapter: ArchAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Full causal attention maps of every head: ``[layers, heads, n * T * T]`` (keep ``T`` small)."""
    maps: dict[int, torch.Tensor] = {}

    def hook_for(idx):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            q, k, _ = adapter.qkv(module, x, *kwargs["position_embeddings"])
            rows = [
                p
                for _, p in attention_chunks(
                    q, k, float(module.scaling), adapter.sliding_window(idx), chunk=ids.shape[-1]
                )
            ]
            probs = torch.cat(rows, dim=-2)  # [B, H, T, T]
            maps[idx] = probs.transpose(0, 1).reshape(probs.shape[1], -1)

        return hook

    handles = [
        adapter.attention(model, i).register_forward_pre_hook(hook_for(i), with_kwargs=True)
        for i in range(adapter.n_layers)
    ]
    try:
        model.get_decoder()(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([maps[i] for i in range(adapter.n_layers)])


def cross_scale_similarity(large: torch.Tensor, small: torch.Tensor) -> dict[str, torch.Tensor]:
    """IAM's similarity of attention maps between two models on the same tokens.

    ``large [L1, H1, D]``, ``small [L2, H2, D]``. Returns head-averaged map similarity
    ``[L1, L2]``, best-head similarity ``[L1, L2]`` (for each large head its most similar
    small head in that layer, averaged over the large layer's heads) and the head table.
    """
    l1, h1, _ = large.shape
    l2, h2, _ = small.shape
    head_avg = cosine_matrix(large.mean(1), small.mean(1))
    heads = cosine_matrix(large.reshape(l1 * h1, -1), small.reshape(l2 * h2, -1)).view(l1, h1, l2, h2)
    best_head = heads.max(dim=-1).values.mean(dim=1)
    return {"head_averaged": head_avg, "best_head": best_head, "heads": heads}
