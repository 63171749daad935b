"""kvx: upcycle pretrained causal LMs into models with a far smaller KV cache."""

from .errors import KvxError
from .loading import load, load_model
from .plan import FullSpec, MLASpec, Plan

__version__ = "0.1.0"
__all__ = ["FullSpec", "KvxError", "MLASpec", "Plan", "load", "load_model"]
