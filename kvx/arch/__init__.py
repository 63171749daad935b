"""Architecture adapters: every family quirk kvx knows lives in this package."""

from __future__ import annotations

from ..errors import KvxError
from .base import ArchAdapter, AttentionWeights
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .qwen import Qwen2Adapter, Qwen3Adapter

ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(config) -> ArchAdapter:
    """The adapter for a model config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls(config)
            adapter.check_supported()
            return adapter
    raise KvxError(f"model family {model_type!r} is not supported (supported: {', '.join(supported_model_types())})")


__all__ = ["ArchAdapter", "AttentionWeights", "get_adapter", "supported_model_types"]
