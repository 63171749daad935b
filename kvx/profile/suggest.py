"""Turn profile measurements into a per-layer plan that meets a KV-size target.

1. Streaming (optional): the laziest layers whose lazy ratio reaches a threshold, at most
   ``max_streaming`` of the layers (LightTransfer's top-k choice). Their cost is counted at
   the context length the plan is for.
2. MLA for the rest, sized unevenly (as CARE argues), by one of two rules. ``spectrum``: the
   same RoPE dims everywhere; all layers' normalised ``[K_nope; V]`` eigenvalues are pooled
   and the largest ones win, which maximises the total share of energy kept for the budget.
   ``output`` / ``loss``: each layer's measured error over a grid of (kv_rank, rope_dims)
   (``sensitivity.py``), and the sizes that minimise the summed error under the budget.
3. A layer whose MLA cost would reach its full cost stays ``full``.

Or (``--condensed``) layer-condensed groups: the layers cut into ``n / ratio`` runs of adjacent
layers of one kind (global or local), each run's first layer its source and the others reading
its K/V (cross-layer attention: no iterative prefill), the cut that maximises the measured
cross-layer K/V similarity of every reader to its source.
"""

from __future__ import annotations

import math

import torch

from ..errors import KvxError
from ..plan import CacheGeometry, CondensedSpec, FullSpec, MappedSpec, MLASpec, Plan, StreamingSpec
from .sensitivity import LayerCurve, allocate


def default_rope_dims(geom: CacheGeometry, target_ratio: float) -> int:
    """About 3/8 of each layer's budget for RoPE keys (SmolLM2 at 4x: 36 of 96), whole pairs per KV head."""
    unit = 2 * geom.n_kv_heads
    budget = 2 * geom.n_kv_heads * geom.head_dim / target_ratio
    return max(unit, int(0.375 * budget // unit) * unit)


def check_room(
    geom: CacheGeometry, n_layers: int, target_ratio: float, rope_dims: int, budget: float | None = None
) -> None:
    """Fail early when every layer as MLA cannot fit ``target_ratio`` with a latent of at least 1."""
    if target_ratio < 1:
        raise KvxError(f"--target-kv-ratio {target_ratio} must be at least 1")
    full = 2 * geom.n_kv_heads * geom.head_dim
    budget = n_layers * full / target_ratio if budget is None else budget
    per_layer = rope_dims + (geom.n_kv_heads if geom.k_norm else 0) + 1
    if n_layers and int(budget) < n_layers * per_layer:
        raise KvxError(
            f"a {target_ratio}x cut leaves no room for a latent with --rope-dims {rope_dims}: "
            "lower --rope-dims or --target-kv-ratio"
        )


def suggest_plan(
    geom: CacheGeometry,
    spectra: list[torch.Tensor],
    lazy: list[float],
    target_ratio: float = 4.0,
    rope_dims: int | None = None,
    streaming: bool = False,
    lazy_threshold: float = 0.9,
    max_streaming: float = 0.5,
    sink: int = 4,
    window: int = 1020,
    context: int = 8192,
    base_model: str | None = None,
    curves: list[LayerCurve] | None = None,
    allocation: str = "spectrum",
) -> Plan:
    """The plan for ``target_ratio`` (base bytes / plan bytes at ``context`` tokens)."""
    n = len(spectra)
    full = 2 * geom.n_kv_heads * geom.head_dim
    rope = default_rope_dims(geom, target_ratio) if rope_dims is None else rope_dims
    extra = geom.n_kv_heads if geom.k_norm else 0
    budget = n * full / target_ratio  # floats per token, all layers

    specs: list = [None] * n
    if streaming:
        lazy_first = sorted(range(n), key=lambda i: -lazy[i])
        for i in lazy_first[: int(max_streaming * n)]:
            if lazy[i] >= lazy_threshold:
                specs[i] = StreamingSpec(sink, window)
                budget -= full * min(1.0, (sink + window) / context)
    mla_layers = [i for i in range(n) if specs[i] is None]
    check_room(geom, len(mla_layers), target_ratio, rope, budget)
    if curves is not None:
        for i, spec in zip(mla_layers, allocate([curves[i] for i in mla_layers], geom, int(budget))):
            specs[i] = spec
        return _finish(Plan(specs, base_model), geom, n, target_ratio, context, allocation)
    rank_budget = int(budget) - len(mla_layers) * (rope + extra)
    ranks = {i: 1 for i in mla_layers}  # every MLA layer keeps at least one latent dim
    pool = []
    for i in mla_layers:
        ev = spectra[i] / spectra[i].sum().clamp_min(1e-30)
        pool += [(float(e), i) for e in ev[1:]]
    pool.sort(reverse=True)
    for _, i in pool[: max(rank_budget - len(mla_layers), 0)]:
        ranks[i] += 1
    for i in mla_layers:
        if ranks[i] + rope + extra >= full:
            specs[i] = FullSpec()
        else:
            specs[i] = MLASpec(ranks[i], rope, "2norm")
    return _finish(Plan(specs, base_model), geom, n, target_ratio, context, "spectrum")


def _finish(plan: Plan, geom: CacheGeometry, n: int, target_ratio: float, context: int, allocation: str) -> Plan:
    # the base's cache at the same context, its local layers' windows included (Gemma 3)
    expected = Plan([FullSpec()] * n).kv_bytes(geom, context, 1) / plan.kv_bytes(geom, context, 1)
    plan.meta = {
        "suggested_by": "kvx profile",
        "allocation": allocation,
        "target_kv_ratio": target_ratio,
        "expected_kv_ratio": round(expected, 3),
        "context": context,
    }
    return plan


def suggest_condensed(
    geom: CacheGeometry,
    similarity: list[list[float]],
    target_ratio: float = 2.0,
    context: int = 8192,
    base_model: str | None = None,
) -> Plan:
    """Condensed groups for ``target_ratio``: ``ceil(n / ratio)`` sources, the layers split into
    adjacent runs (one kind of attention each) by dynamic programming on the summed similarity
    of each reader to its run's first layer."""
    n = len(similarity)
    if target_ratio < 1:
        raise KvxError(f"--target-kv-ratio {target_ratio} must be at least 1")
    kinds = list(geom.layer_types) if geom.layer_types else ["full_attention"] * n
    changes = 1 + sum(a != b for a, b in zip(kinds, kinds[1:]))  # runs can never mix kinds
    groups = max(math.ceil(n / target_ratio), changes)
    worst = float("-inf")

    def gain(a: int, b: int) -> float:  # layers a..b-1, source a
        if any(kinds[i] != kinds[a] for i in range(a, b)):
            return worst
        return sum(similarity[i][a] for i in range(a + 1, b))

    best = [[worst] * (groups + 1) for _ in range(n + 1)]
    cut = [[0] * (groups + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for b in range(1, n + 1):
        for g in range(1, groups + 1):
            for a in range(g - 1, b):
                value = best[a][g - 1] + gain(a, b)
                if value > best[b][g]:
                    best[b][g], cut[b][g] = value, a
    specs: list = [None] * n
    b, g = n, groups
    while b:
        a = cut[b][g]
        specs[a:b] = [CondensedSpec(a)] * (b - a)
        b, g = a, g - 1
    plan = _finish(Plan(specs, base_model), geom, n, target_ratio, context, "condensed")
    plan.meta["how"] = (
        f"{groups} runs of adjacent layers, each reading its first layer's K/V, chosen to maximise the "
        "cross-layer K/V cosine similarity (profile) of the readers to their source"
    )
    return plan


MAP_ORDERS = ("iam", "similar")


def mapping_order(n: int, order: str, similarity: torch.Tensor) -> list[int]:
    """The layers ``--mapped`` fills, in order. ``iam``: IAM's (never the first layers; from the last
    layer backwards to the middle, then forwards from a quarter in, the early layers last);
    ``similar``: by how like its best reference layer each layer's attention is."""
    if order not in MAP_ORDERS:
        raise KvxError(f"--map-order {order!r}: choose from {', '.join(MAP_ORDERS)}")
    if order == "similar":
        return sorted(range(1, n), key=lambda i: -float(similarity[i].max()))
    skip, quarter, half = max(1, n // 8), max(1, n // 4), n // 2
    late = list(range(n - 1, half - 1, -1))
    middle = list(range(max(skip, quarter), half))
    return late + middle + [i for i in range(skip, n) if i not in late + middle]


def suggest_mapped(
    heads: torch.Tensor, fraction: float, order: str, base_model: str | None = None, model: str = "reference"
) -> Plan:
    """Mapped layers for ``fraction`` of the model: each onto the reference layer whose heads are most
    like its own (``heads [L, H, L_ref, H_ref]``: cosine of flattened attention maps), each head onto
    its most similar head there. ``model="self"`` (``heads``: the model against itself): each onto the
    most similar earlier layer that is not mapped (a source keeps its own attention)."""
    n = heads.shape[0]
    count = round(fraction * n)
    if not 1 <= count < n:
        raise KvxError(f"--mapped {fraction} maps {count} of {n} layers: give a share that maps 1..{n - 1}")
    best = heads.max(dim=-1).values.mean(dim=1)  # [L, L_ref]: each head's best match, averaged
    specs: list = [FullSpec()] * n
    chosen = mapping_order(n, order, best)[:count]
    for i in chosen:
        sources = range(best.shape[1]) if model == "reference" else [j for j in range(i) if j not in chosen]
        j = max(sources, key=lambda s: float(best[i, s]))  # the first of equals, as argmax
        specs[i] = MappedSpec(j, model, tuple(int(h) for h in heads[i, :, j].argmax(-1)))
    return Plan(specs, base_model)
