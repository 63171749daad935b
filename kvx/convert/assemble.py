"""One generic assembler for any plan: base weights where a layer keeps them, each method's
tensors where it converted one, and nothing left to chance.

Every key of the new model must be filled (missing is an error), every tensor handed in must
have a place (unexpected is an error), and every base tensor a method does not carry over
must be declared dropped by it, with the reason; the reasons are logged, so that a drop
(Qwen2's query bias in the deepseek layout) is a decision, never an accident.
"""

from __future__ import annotations

import copy
import logging

from ..loading import build_uninitialised
from ..methods import LayerOutput, get_method, method_of
from ..modeling.modeling_kvx import kvx_class_for
from ..plan import Plan

log = logging.getLogger("kvx.convert")


def assemble(base_model, plan: Plan, outputs: dict[int, LayerOutput], adapter, meta: dict | None = None):
    """The kvx model of ``plan``: ``outputs[i]`` is layer ``i``'s attention state (from its method)."""
    config = copy.deepcopy(base_model.config)
    config.kvx = {**plan.to_dict(), **(meta or {})}
    model = build_uninitialised(kvx_class_for(config), config)
    model.to(next(base_model.parameters()).dtype)
    base_state = base_model.state_dict()
    prefixes = {i: adapter.attention_prefix(i) for i in outputs}
    state = {k: v for k, v in base_state.items() if not k.startswith(tuple(prefixes.values()))}
    for i, out in outputs.items():
        prefix, kind = prefixes[i], plan.layers[i].kind
        base_keys = {k[len(prefix) :] for k in base_state if k.startswith(prefix)}
        silent = sorted(base_keys - set(out.state) - set(out.dropped))
        if silent:
            raise RuntimeError(f"layer {i}: the {kind} conversion drops {silent} without saying why")
        for key, why in sorted(out.dropped.items()):
            log.info("layer %d (%s): %s not carried over: %s", i, kind, key, why)
        state.update({prefix + k: v for k, v in out.state.items()})
    for kind in dict.fromkeys(s.kind for s in plan.layers):  # model-level state (a shared predictor)
        state.update(get_method(kind).model_state(plan, None, {})[0])
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"the converted model does not fit its runtime: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def convert_layers(base_model, plan: Plan, adapter, stats: dict, on_layer=None, options=None) -> dict[int, LayerOutput]:
    """Each layer through its method's pure weight transform (``options``: conversion options by kind)."""
    from ..methods import LayerInput

    outputs = {}
    for i, spec in enumerate(plan.layers):
        layer = LayerInput.read(adapter, base_model, i, stats.get(i), (options or {}).get(spec.kind), plan.layers)
        outputs[i] = method_of(spec).convert_layer(spec, layer)
        if on_layer:
            on_layer(1)
    return outputs


def convert_model(base_model, plan: Plan, stats: dict | None = None, on_layer=None, options=None):
    """``base_model`` converted per ``plan`` in memory (no checkpoint): every layer through its
    method, then assembled. ``stats``: calibration statistics by layer, where methods use them."""
    from ..arch import get_adapter
    from ..methods import check_plan, prepare_plan

    adapter = get_adapter(base_model.config)
    check_plan(plan, adapter)  # as kvx convert does: a bad spec is its one-line error, not a shape error later
    prepare_plan(plan, adapter, options or {}, None)
    outputs = convert_layers(base_model, plan, adapter, stats or {}, on_layer, options)
    return assemble(base_model, plan, outputs, adapter, {"k_norm_eps": adapter.k_norm_eps()}), outputs
