"""Heal a converted model: short teacher distillation on accelerate."""

from .data import SEED_PROMPTS, training_windows
from .loop import DistillConfig, run_distill, select_trainable
from .losses import LOSSES, distill_loss, kl_loss

__all__ = ["LOSSES", "SEED_PROMPTS", "DistillConfig", "distill_loss", "kl_loss", "run_distill", "select_trainable", "training_windows"]
