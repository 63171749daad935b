"""The methods kvx implements, one per layer spec kind: the only place that lists them.

Adding a method: its spec in ``modeling/kvx_specs.py``, its runtime in
``modeling/kvx_<kind>.py`` (+ a line in ``modeling_kvx.RUNTIMES``), its ``Method`` here
(+ a line in ``METHODS``), and an entry in ``tests/specs.py``.
"""

from __future__ import annotations

from ..errors import KvxError
from .base import LayerInput, LayerOutput, Method, Option
from .condensed import CondensedMethod
from .evict import EvictMethod
from .full import FullMethod
from .mapped import MappedMethod
from .mla import MLAMethod
from .streaming import StreamingMethod

DEFAULT_TARGET = "mla"  # what `kvx convert` converts to when no --to is given

METHODS: dict[str, Method] = {
    "full": FullMethod(),
    "mla": MLAMethod(),
    "streaming": StreamingMethod(),
    "condensed": CondensedMethod(),
    "evict": EvictMethod(),
    "mapped": MappedMethod(),
}


def get_method(kind: str) -> Method:
    if kind not in METHODS:
        raise KvxError(
            f"--to {kind!r} is not implemented yet (available: {', '.join(k for k in METHODS if k != 'full')})"
        )
    return METHODS[kind]


def method_of(spec) -> Method:
    return get_method(spec.kind)


def check_plan(plan, adapter) -> None:
    """Every layer's spec checked for its layer, then each kind's layers together: before any work."""
    for i, spec in enumerate(plan.layers):
        method_of(spec).check(spec, adapter, i)
    for kind in sorted(plan.kinds()):
        get_method(kind).check_plan(plan, adapter)


def prepare_plan(plan, adapter, options: dict, tokenizer) -> None:
    """Each kind's outside needs (a reference model) checked and recorded, before any work."""
    for kind in sorted(plan.kinds()):
        get_method(kind).prepare(plan, adapter, options.get(kind, {}), tokenizer)


def shortcut_options() -> dict[str, tuple[str, Option]]:
    """Every method's shortcut options by name, with the kind that owns each."""
    out: dict[str, tuple[str, Option]] = {}
    for kind, method in METHODS.items():
        for name, option in {**method.options, **method.conversion_options}.items():
            if name in out:
                raise RuntimeError(f"option {name!r} of {kind} is already {out[name][0]}'s")
            out[name] = (kind, option)
    return out


__all__ = [
    "DEFAULT_TARGET",
    "METHODS",
    "LayerInput",
    "LayerOutput",
    "Method",
    "Option",
    "check_plan",
    "prepare_plan",
    "get_method",
    "method_of",
    "shortcut_options",
]
