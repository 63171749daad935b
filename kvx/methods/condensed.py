"""``condensed``: layers that attend to another layer's K/V and keep none of their own.

Papers: LCKV ("Layer-Condensed KV Cache for Efficient Inference of Large Language Models",
Wu & Tu 2024: most layers read the top layer's K/V, a few warm-up layers keep their own) and
its generalisation ("A Systematic Study of Cross-Layer KV Sharing for Efficient LLM
Inference", Wu et al. 2025), which also covers cross-layer attention (Brandon et al. 2024:
layers read an earlier layer's K/V). Upcycling follows LCKV's ``convert_pretrained.py``: every
weight is copied; a source's K/V projections become the mean of those of the layers that read
it (``--kv-init mean``), or stay its own (``keep``). Healing is kvx's distillation, not the
paper's 100B+ tokens of continued pre-training.
"""

from __future__ import annotations

import torch

from ..errors import KvxError
from ..modeling.kvx_specs import CondensedSpec
from .base import LayerInput, LayerOutput, Method, Option

KV_INITS = ("mean", "keep")
_DROPPED = {
    "k_proj.": "the layer reads its source's keys",
    "v_proj.": "the layer reads its source's values",
    "k_norm.": "the layer reads its source's (normalised) keys",
}


def readers(plan_layers, source: int) -> list[int]:
    """The layers whose K/V are ``source``'s (``source`` itself included when it is its own)."""
    return [i for i, s in enumerate(plan_layers) if isinstance(s, CondensedSpec) and s.source == source]


class CondensedMethod(Method):
    kind = "condensed"
    spec_type = CondensedSpec
    options = {
        "source": Option(int, "condensed: the layer whose K/V the layers attend to (that layer keeps its own)."),
    }
    conversion_options = {
        "kv_init": Option(
            str, "condensed: a source's K/V projections: mean (of its readers', LCKV) or keep (its own)."
        ),
    }
    tags = ("lckv", "cross-layer-kv-sharing")

    def make_spec(self, args: dict, adapter, calibrated: bool) -> CondensedSpec:
        if "source" not in args:
            raise KvxError(
                "condensed needs its source: --to 'condensed(source=J)' or --source J (the layer whose K/V the "
                "converted layers read; convert layer J too)"
            )
        return super().make_spec(args, adapter, calibrated)

    def check(self, spec: CondensedSpec, adapter, layer: int) -> None:
        if not 0 <= spec.source < adapter.n_layers:
            raise KvxError(
                f"layer {layer}: condensed source {spec.source} does not exist (layers 0..{adapter.n_layers - 1})"
            )
        if spec.passes < 0 or spec.grad_passes < 0 or spec.passes + spec.grad_passes < 1:
            raise KvxError(
                f"layer {layer}: condensed needs passes >= 0, grad_passes >= 0 and at least one pass in all "
                f"(got {spec.passes}, {spec.grad_passes})"
            )
        mine, theirs = adapter.sliding_window(layer), adapter.sliding_window(spec.source)
        if mine != theirs:

            def say(w):
                return f"a local window of {w}" if w else "global attention"

            raise KvxError(
                f"layer {layer} ({say(mine)}) cannot read layer {spec.source}'s K/V ({say(theirs)}): "
                "pair layers of the same kind"
            )
        if spec.source > layer and mine is not None:
            raise KvxError(f"layer {layer}: local-window layers can only read a layer below them")

    def check_plan(self, plan, adapter) -> None:
        layers = plan.layers
        above = set()
        for i, spec in enumerate(layers):
            if not isinstance(spec, CondensedSpec) or spec.source == i:
                continue
            source = layers[spec.source]
            if source.kind == "mla":
                if spec.source > i or adapter.sliding_window(spec.source) is not None:
                    where = "above it" if spec.source > i else "with a local window"
                    raise KvxError(
                        f"layer {i} reads layer {spec.source}, an MLA layer {where}: an MLA latent can be read "
                        "only by layers above a global MLA layer"
                    )
                continue
            if source.kind == "streaming":
                raise KvxError(
                    f"layer {i} reads layer {spec.source}, a streaming layer: a reader would see only that layer's "
                    f"sinks and window, which nothing measured says suits it; make layer {spec.source} "
                    f"condensed(source={spec.source}) or the reader streaming too"
                )
            if not isinstance(source, CondensedSpec):
                raise KvxError(
                    f"layer {i} reads layer {spec.source}'s K/V, but layer {spec.source} is {source.kind}: make it "
                    f"condensed(source={spec.source}) (convert it too, e.g. add it to --layers)"
                )
            if source.source != spec.source:
                raise KvxError(
                    f"layer {i} reads layer {spec.source}, which itself reads layer {source.source}: "
                    f"point layer {i} at {source.source} (a source keeps its own K/V)"
                )
            if spec.source > i:
                above.add((spec.passes, spec.grad_passes))
        if len(above) > 1:
            raise KvxError(f"layers reading a layer above them must share passes and grad_passes (got {sorted(above)})")

    def needs(self, spec, calibrated: bool, options: dict | None = None) -> frozenset[str]:
        init = (options or {}).get("kv_init") or "mean"
        if init not in KV_INITS:
            raise KvxError(f"--kv-init {init!r}: choose from {', '.join(KV_INITS)}")
        return frozenset()

    def standalone(self, spec: CondensedSpec, layer: int) -> bool:
        return spec.source == layer

    def convert_layer(self, spec: CondensedSpec, layer: LayerInput) -> LayerOutput:
        state = dict(layer.state)
        i = layer.index
        if spec.source != i:  # a reader: its K/V projections are gone
            dropped = {k: why for k in state for p, why in _DROPPED.items() if k.startswith(p)}
            return LayerOutput({k: v for k, v in state.items() if k not in dropped}, dropped)
        group = readers(layer.plan, i) if layer.plan is not None else [i]
        if (layer.options.get("kv_init") or "mean") == "keep" or group == [i]:
            return LayerOutput(state, info={"condensed readers": float(len(group))})
        peers = [layer.state if j == i else layer.peer(j) for j in group]
        for name in state:
            if name.startswith(("k_proj.", "v_proj.")):
                state[name] = torch.stack([p[name].float() for p in peers]).mean(0)
        return LayerOutput(state, info={"condensed readers": float(len(group))})

    def trainable(self, spec: CondensedSpec, layer: int | None = None) -> tuple[str, ...]:
        if layer is None or spec.source == layer:
            return ("k_proj", "v_proj")
        return ("q_proj",) if spec.train_q else ()
