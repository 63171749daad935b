"""The convert stage: a plan in, a checkpoint out (``run.convert``), through the methods' pure
weight transforms and one generic assembler."""

from .config import ConvertConfig
from .run import convert

__all__ = ["ConvertConfig", "convert"]
