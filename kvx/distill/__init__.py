"""Heal a converted model: short teacher distillation on accelerate."""

from .config import DistillConfig
from .data import training_windows
from .loop import run_distill, select_trainable
from .losses import LOSSES, distill_loss, kl_loss
from .run import distill

__all__ = [
    "LOSSES",
    "DistillConfig",
    "distill",
    "distill_loss",
    "kl_loss",
    "run_distill",
    "select_trainable",
    "training_windows",
]
