"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMS norm) families."""

from .base import ArchAdapter, QKNormAdapter


class Qwen2Adapter(ArchAdapter):
    family = "qwen2"
    model_types = ("qwen2",)

    def check_supported(self) -> None:
        super().check_supported()
        if getattr(self.config, "use_sliding_window", False):
            from ..errors import KvxError

            raise KvxError("qwen2 with use_sliding_window=True is not supported yet")


class Qwen3Adapter(QKNormAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
