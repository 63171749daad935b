"""Example specs of every method, for the one test that runs every invariant over spec x family.

Adding a method: add its examples here. Each example makes a spec for a family's geometry
(an ``ArchAdapter``) and names the families whose check must refuse it, before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvx.plan import CondensedSpec, EvictSpec, FullSpec, MappedSpec, MLASpec, StreamingSpec


@dataclass(frozen=True)
class Example:
    id: str
    make: Callable  # adapter -> spec, applied to every layer
    refused_by: tuple[str, ...] = ()  # families where the method's check must refuse it
    first: Callable | None = None  # adapter -> layer 0's spec, where the method cannot run there

    def layers(self, adapter) -> list:
        """The example's plan: ``make`` on every layer (``first`` on layer 0, if given)."""
        spec = self.make(adapter)
        return [self.first(adapter) if self.first else spec] + [spec] * (adapter.n_layers - 1)


def _two_pairs(a) -> int:  # RoPE dims for two kept frequency pairs per KV head
    return 4 * a.n_kv_heads


EXAMPLES: list[Example] = [
    Example("full", lambda a: FullSpec()),
    Example("mla-kvx-2norm", lambda a: MLASpec(8, _two_pairs(a), "2norm")),
    Example("mla-kvx-uniform", lambda a: MLASpec(10, _two_pairs(a), "uniform")),
    Example("mla-shared", lambda a: MLASpec(12, 8, "high", "shared"), refused_by=("qwen3", "gemma3")),
    Example("mla-deepseek", lambda a: MLASpec(12, 8, "high", "deepseek"), refused_by=("qwen3", "gemma3")),
    Example("streaming", lambda a: StreamingSpec(2, 8), refused_by=("gemma3",)),  # gemma3 has local-window layers
    Example("streaming-sinkless", lambda a: StreamingSpec(0, 9), refused_by=("gemma3",)),
    # condensed on every layer: one source, every other layer reads it. Enough passes to be exact
    # at the test's 40 tokens. gemma3's layers alternate local and global: none can pair here.
    Example("condensed-down", lambda a: CondensedSpec(0), refused_by=("gemma3",)),  # cross-layer attention
    Example("condensed-top", lambda a: CondensedSpec(a.n_layers - 1, passes=40), refused_by=("gemma3",)),  # LCKV
    Example("condensed-both", lambda a: CondensedSpec(1, passes=40), refused_by=("gemma3",)),
    # evict: a budget above the test's 40 tokens is exact; the eviction itself is tests/test_evict.py's
    *(
        Example(f"evict-{p}", lambda a, p=p: EvictSpec(48, 4, 8, 4, p), refused_by=("gemma3",))
        for p in ("recent", "h2o", "snapkv", "previous")
    ),
    # the predictor is trained on the matrix's calibration text and carried by the checkpoint
    Example("evict-predictor", lambda a: EvictSpec(48, 4, 8, 4, "predictor", history=16), refused_by=("gemma3",)),
    Example("evict-offload", lambda a: EvictSpec(48, 4, 8, 4, "h2o", offload=True), refused_by=("gemma3",)),
    # mapped onto layer 0 of the same model (a reference model: tests/test_mapped.py); heads permuted
    Example(
        "mapped-self",
        lambda a: MappedSpec(0, "self", tuple(reversed(range(a.n_heads)))),
        refused_by=("gemma3",),  # local-window layers cannot be mapped
        first=lambda a: FullSpec(),
    ),
]
