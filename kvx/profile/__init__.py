"""The profile stage: per-layer measurements and a suggested plan."""

from .config import ProfileConfig
from .run import profile

__all__ = ["ProfileConfig", "profile"]
