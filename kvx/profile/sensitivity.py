"""How much each layer suffers per latent or RoPE dimension removed, and the per-layer sizes that
minimise the total under one KV budget.

Spectra say how much of ``[K_nope; V]``'s energy a rank keeps, not what the model loses: a key
error counts only through the queries that read it, and layers matter unequally. So the sweep
converts every layer at a grid of (kv_rank, rope_dims), closed-form (the ``pca`` initialisation,
no fitting: the cheap part of the real conversion), and scores each point on a held-out window
by one of two measures. ``output``: ``||y_converted - y||^2 / ||h||^2``, the attention output's
error against the residual stream it is added to (``h``, the layer's input), one layer's forward
per point. ``loss``: the KL of the model's next-token distributions from the original's with
that layer alone converted, one model forward per point (what the user finally sees; additive
across layers to first order). The allocation then picks one grid point per layer (or keeps the
layer full) minimising the summed scores under the budget: an exact knapsack over integer floats,
each layer's scores interpolated (log-linearly) between measured ranks so that the budget is
spent to the float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..calibration import accumulate, new_stats
from ..errors import KvxError
from ..layerwise import Walker, attention_error, module_for, run_layer
from ..methods import LayerInput, method_of
from ..methods.mla.maths import full_rank
from ..plan import CacheGeometry, FullSpec, MLASpec

SEQ = 512  # the sweep's windows (the profile's are cut to this length: attention cost stays small)
BATCH = 4  # windows per batch of statistics; one more window, held out, is what the scores are measured on


@dataclass
class LayerCurve:
    """One layer's measured scores: ``scores[rope_dims][kv_rank]`` (residual-relative output error)."""

    scores: dict[int, dict[int, float]]


def rank_grid(budget_per_layer: float, limit: int) -> list[int]:
    """Ranks from an eighth to three times the average latent a layer can afford, roughly geometric."""
    lo, hi = max(1, int(budget_per_layer / 8)), min(limit, int(3 * budget_per_layer))
    out, r = [], float(lo)
    while r < hi:
        out.append(int(r))
        r = max(r * 1.5, r + 1)
    return sorted(set(out + [hi]))


def rope_grid(rope_dims: int, unit: int, limit: int) -> list[int]:
    """The given RoPE size, half of it and one and a half times it, in whole pairs per KV head."""
    sizes = {max(unit, round(rope_dims * f / unit) * unit) for f in (0.5, 1.0, 1.5)}
    return sorted(s for s in sizes if s <= limit)


SCORES = ("output", "loss")


def _logp(model, probe: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=probe, use_cache=False).logits.double(), dim=-1)


def _kl(model, probe: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean KL(original || model) of the next-token distributions on ``probe``."""
    return float((ref.exp() * (ref - _logp(model, probe))).sum(-1).mean())


@torch.no_grad()
def sweep(
    model, adapter, windows: torch.Tensor, ranks: list[int], ropes: list[int], score: str = "output", on_layer=None
) -> list[LayerCurve]:
    """Every layer's scores over ``ropes`` x ``ranks``, on the original model's own hidden states."""
    if windows.shape[1] > SEQ:
        windows = windows[:, : windows.shape[1] // SEQ * SEQ].reshape(-1, SEQ)
    if windows.shape[0] < 2:
        raise KvxError("--allocate sensitivity needs at least two windows of text (one is held out): raise --tokens")
    batches = list(windows[:-1].split(BATCH)) + [windows[-1:]]
    walker = Walker(model, adapter, batches)
    config, hs = model.config, walker.hs
    meta = {"k_norm_eps": adapter.k_norm_eps()}
    hidden, n_kv, hd = config.hidden_size, adapter.n_kv_heads, adapter.head_dim
    probe = batches[-1]
    ref = (
        torch.log_softmax(model(input_ids=probe, use_cache=False).logits.double(), dim=-1) if score == "loss" else None
    )
    curves = []
    for i in range(adapter.n_layers):
        layer, attn = walker.layer(i), adapter.attention(model, i)
        stats = new_stats(hidden)
        xs, kws, ys, next_hs = [], [], [], []
        for b, h in enumerate(hs):
            out, x, kw, y = run_layer(layer, attn, h, walker.calls[b][i])
            if b < len(hs) - 1:
                accumulate(stats, attn, x, adapter)
            xs.append(x), kws.append(kw), ys.append(y), next_hs.append(out)
        weight = float(ys[-1].double().pow(2).sum() / hs[-1].double().pow(2).sum().clamp_min(1e-30))
        layer_in = LayerInput.read(adapter, model, i, stats, {"init": "pca"})
        scores: dict[int, dict[int, float]] = {}
        for rope in ropes:
            limit = full_rank(n_kv, hd, rope, hidden)
            kept = [r for r in ranks if r < limit]
            if not kept:
                continue
            top = MLASpec(max(kept), rope, "2norm")
            for rank, state in method_of(top).nested_ranks(top, layer_in, kept).items():
                spec = MLASpec(rank, rope, "2norm")
                module = module_for(attn, spec, config, meta, state)
                if score == "loss":
                    with adapter.attention_replaced(model, i, module):
                        value = _kl(model, probe, ref)
                else:
                    value = attention_error(module, xs[-1:], kws[-1:], ys[-1:]) * weight
                scores.setdefault(rope, {})[rank] = max(value, 0.0)
        curves.append(LayerCurve(scores))
        hs = next_hs
        if on_layer:
            on_layer(1)
    return curves


def _interpolated(measured: dict[int, float]) -> dict[int, float]:
    """Scores at every integer rank between the measured ones (log-linear; a score of 0 stays 0)."""
    points = sorted(measured.items())
    out = dict(points)
    for (r0, s0), (r1, s1) in zip(points, points[1:]):
        l0, l1 = math.log(max(s0, 1e-30)), math.log(max(s1, 1e-30))
        for r in range(r0 + 1, r1):
            out[r] = math.exp(l0 + (l1 - l0) * (r - r0) / (r1 - r0))
    return out


def allocate(curves: list[LayerCurve], geom: CacheGeometry, budget: int) -> list:
    """One spec per layer (MLA at a grid point, or full) minimising the summed scores, costing at most
    ``budget`` cached floats per token over all the layers."""
    full = 2 * geom.n_kv_heads * geom.head_dim
    extra = geom.n_kv_heads if geom.k_norm else 0
    inf = float("inf")
    dp = torch.full((budget + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choices = []  # per layer: [n_options] specs, costs, and the argmin table [budget+1]
    for curve in curves:
        options = [(FullSpec(), full, 0.0)]
        for rope, measured in curve.scores.items():
            for rank, score in _interpolated(measured).items():
                if rank + rope + extra < full:
                    options.append((MLASpec(rank, rope, "2norm"), rank + rope + extra, score))
        costs = torch.tensor([c for _, c, _ in options])
        scores = torch.tensor([s for _, _, s in options], dtype=torch.float64)
        idx = torch.arange(budget + 1)[None, :] - costs[:, None]  # [options, budget+1]
        cand = torch.where(idx >= 0, dp[idx.clamp_min(0)] + scores[:, None], torch.full_like(idx, inf, dtype=dp.dtype))
        dp, arg = cand.min(dim=0)
        choices.append((options, arg))
    if math.isinf(float(dp.min())):
        raise KvxError(f"no per-layer sizes fit {budget} KV floats per token: lower --target-kv-ratio or --rope-dims")
    b = int(dp.argmin())
    specs = []
    for options, arg in reversed(choices):
        spec, cost, _ = options[int(arg[b])]
        specs.append(spec)
        b -= cost
    return specs[::-1]
