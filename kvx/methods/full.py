"""``full``: the base model's attention, untouched (the layers a plan does not convert)."""

from __future__ import annotations

from ..modeling.kvx_specs import FullSpec
from .base import Method


class FullMethod(Method):
    kind = "full"
    spec_type = FullSpec
