"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMS norm) families."""

import copy

from .base import ArchAdapter, QKNormAdapter


class _QwenSlidingMixin:
    """Qwen2/Qwen3 configs take per-layer ``layer_types`` once ``use_sliding_window`` is on."""

    def native_sliding_config(self, layer_types, window):
        config = copy.deepcopy(self.config)
        config.use_sliding_window = True
        config.sliding_window = window
        config.layer_types = list(layer_types)
        return config


class Qwen2Adapter(_QwenSlidingMixin, ArchAdapter):
    family = "qwen2"
    model_types = ("qwen2",)

    def check_supported(self) -> None:
        super().check_supported()
        if getattr(self.config, "use_sliding_window", False):
            from ..errors import KvxError

            raise KvxError("qwen2 with use_sliding_window=True is not supported yet")


class Qwen3Adapter(_QwenSlidingMixin, QKNormAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
