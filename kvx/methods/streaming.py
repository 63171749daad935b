"""``streaming``: attention sinks + a recent window on the laziest layers.

LightTransfer ("LightTransfer: Your Long-Context LLM is Secretly a Hybrid Model with Effortless
Adaptation", Zhang et al. 2024) on top of StreamingLLM's attention sinks (Xiao et al. 2023):
the layers whose attention already falls mostly on the first tokens and the recent window
(their *lazy ratio*) keep only those tokens' K/V. Weights are the base layer's own; only the
cache changes, so there is nothing to train in these layers.
"""

from __future__ import annotations

from ..errors import KvxError
from ..modeling.kvx_specs import StreamingSpec
from .base import Method, Option


class StreamingMethod(Method):
    kind = "streaming"
    spec_type = StreamingSpec
    options = {
        "sink": Option(int, "streaming: attention-sink tokens kept."),
        "window": Option(int, "streaming: recent tokens kept."),
    }
    layer_score = "lazy_ratio"
    auto_fraction = 0.5  # LightTransfer's half
    tags = ("streaming", "attention-sinks")

    def check(self, spec: StreamingSpec, adapter, layer: int) -> None:
        if spec.sink < 0 or spec.window < 1:
            raise KvxError(f"layer {layer}: streaming needs sink >= 0 and window >= 1 (got {spec.sink}, {spec.window})")
        local = adapter.sliding_window(layer)
        if local is not None:
            raise KvxError(f"layer {layer} already attends to a local window of {local}: it cannot be streaming")
