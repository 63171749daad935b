"""``evict``: a cache that holds a fixed budget of tokens and evicts the rest, block by block.

AttentionPredictor ("AttentionPredictor: Temporal Pattern Matters for Efficient LLM
Inference", Yang et al. 2025) keeps sink and local tokens and fills the rest of a token
budget with the blocks of 16 keys it predicts the next step will attend to. Its baselines,
at the same budget, are policies here: StreamingLLM (``recent``), H2O (``h2o``, attention
received), SnapKV (``snapkv``, attention of the prompt's last queries) and the previous step's
attention (``previous``). Unlike the published code, the eviction is real: the cache holds
``budget`` tokens and attention runs over those only. Weights are the base layer's own.
"""

from __future__ import annotations

from ..errors import KvxError
from ..modeling.kvx_specs import POLICIES, EvictSpec
from .base import Method, Option


class EvictMethod(Method):
    kind = "evict"
    spec_type = EvictSpec
    options = {
        "budget": Option(int, "evict: tokens each layer's cache holds (sinks + local + chosen blocks)."),
        "policy": Option(str, f"evict: how blocks are kept: {', '.join(POLICIES)}."),
    }
    tags = ("kv-eviction", "attention-sinks")

    def check(self, spec: EvictSpec, adapter, layer: int) -> None:
        where = f"layer {layer}: evict"
        if spec.policy not in POLICIES:
            raise KvxError(f"{where} policy {spec.policy!r} is unknown (known: {', '.join(POLICIES)})")
        if spec.block < 1 or spec.sink < 0 or spec.local < 1 or spec.observe < 1:
            raise KvxError(f"{where} needs block >= 1, sink >= 0, local >= 1, observe >= 1")
        odd = [f"{n}={getattr(spec, n)}" for n in ("budget", "sink", "local") if getattr(spec, n) % spec.block]
        if odd:
            raise KvxError(f"{where}: {', '.join(odd)} not a multiple of the block size {spec.block}")
        if spec.budget < spec.sink + spec.local + spec.block:
            raise KvxError(
                f"{where} budget {spec.budget} leaves no room for a chosen block: it must be at least "
                f"sink + local + block = {spec.sink + spec.local + spec.block}"
            )
        local = adapter.sliding_window(layer)
        if local is not None:
            raise KvxError(f"layer {layer} already attends to a local window of {local}: it cannot evict")
