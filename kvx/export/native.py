"""``native``: full + sink-free streaming plans as transformers' own per-layer ``layer_types``
(a sliding window), the base weights unchanged: no remote code at all."""

from __future__ import annotations

from pathlib import Path

from ..arch import ArchAdapter
from ..checkpoint import atomic_dir
from ..errors import KvxError
from ..plan import FullSpec, Plan, StreamingSpec
from .base import Exporter


def native_layer_types(plan: Plan) -> tuple[list[str], int]:
    """A plan of full and sink-free streaming layers as transformers ``layer_types`` + window.

    kvx's streaming query sees ``window + 1`` keys (itself included); transformers' sliding
    window counts the query too, so the native window is ``window + 1``.
    """
    windows = set()
    types = []
    for i, spec in enumerate(plan.layers):
        if isinstance(spec, StreamingSpec):
            if spec.sink:
                raise KvxError(
                    f"layer {i} keeps {spec.sink} sink tokens: native sliding windows have no sinks (use --sink 0)"
                )
            windows.add(spec.window)
            types.append("sliding_attention")
        elif isinstance(spec, FullSpec):
            types.append("full_attention")
        else:
            raise KvxError(f"layer {i} is {spec.kind}: only full and streaming layers export as native sliding windows")
    if len(windows) != 1:
        raise KvxError("native export needs at least one streaming layer and one window size for all of them")
    return types, windows.pop() + 1


def export_native(
    base_model, tokenizer, adapter: ArchAdapter, plan: Plan, out: str | Path, overwrite: bool = False
) -> Path:
    """Write the base weights with a native config whose ``layer_types`` realise ``plan``."""
    types, window = native_layer_types(plan)
    config = adapter.native_sliding_config(types, window)
    with atomic_dir(out, overwrite) as tmp:
        original = base_model.config
        base_model.config = config
        try:
            base_model.save_pretrained(tmp)
        finally:
            base_model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


class NativeExport(Exporter):
    name = "native"

    def check(self, plan: Plan, adapter: ArchAdapter) -> None:
        native_layer_types(plan)
        adapter.native_sliding_config(["full_attention"] * adapter.n_layers, 2)

    def write(self, base, converted: Path, tokenizer, adapter, plan, out: Path, overwrite: bool) -> Path:
        from ..loading import load_model

        if base is None:
            raise KvxError(
                "the native export writes the base model's weights: export it with kvx convert --export native"
            )
        return export_native(load_model(base, need_tokenizer=False)[0], tokenizer, adapter, plan, out, overwrite)
