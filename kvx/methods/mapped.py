"""``mapped``: layers that borrow another layer's attention probabilities and cache V only.

Paper: IAM ("Efficient Inference through Attention Mapping between Different-scale LLMs",
Zhao et al. 2025; no public code, so kvx follows the paper). Each head of a mapped layer of the
large model takes the probabilities of its most similar head of a small reference model of
the same family (same tokenizer) run in lockstep; the layer skips its Q/K projections and
QK^T and keeps no K cache. kvx also lets a layer borrow an earlier layer of the same model
(``model=self``: no second model, cross-layer attention sharing).

The reference model is carried inside the checkpoint (its layers up to the deepest one
referenced, as the ``kvx_reference`` module): a pinned Hub reference could vanish, be
changed or be unreachable offline, and the reference is small next to the model it serves.
Its cache counts against the plan: ``Plan.reference_kv_bytes``. Whether a mapping pays is
said before converting (``net_figures``).
"""

from __future__ import annotations

import json

import torch

from ..errors import KvxError
from ..io.staging import note
from ..modeling.kvx_common import cache_kwargs, layer_nbytes
from ..modeling.kvx_mapped import REFERENCE, REFERENCE_KEY, build_reference
from ..modeling.kvx_specs import MAPPED_MODELS, FullSpec, MappedSpec, spec_to_dict
from ..modeling.modeling_kvx import make_cache
from ..progress import no_progress
from .base import LayerInput, LayerOutput, Method, Option

REFERENCE_KINDS = ("full", "mla", "streaming")  # what a reference model's layers may be (no model-level hooks)
ATTENTION_MODULES = ("q_proj", "k_proj", "q_norm", "k_norm")  # what makes a layer's attention probabilities
_DROPPED = {f"{m}.": "the layer takes its source's attention probabilities" for m in ATTENTION_MODULES}


def _mapped(plan, model: str | None = None) -> list[tuple[int, MappedSpec]]:
    return [(i, s) for i, s in enumerate(plan.layers) if s.kind == "mapped" and model in (None, s.model)]


class MappedMethod(Method):
    kind = "mapped"
    spec_type = MappedSpec
    conversion_options = {
        "reference": Option(
            str, "mapped: the smaller model of the same family whose attention mapped layers borrow (model=reference)."
        ),
    }
    tags = ("iam", "attention-mapping")

    def make_spec(self, args: dict, adapter, calibrated: bool) -> MappedSpec:
        if "source" not in args:
            raise KvxError(
                "mapped needs its source: --to 'mapped(source=J)' (layer J of the --reference model) or "
                "'mapped(source=J, model=self)' (an earlier layer of this model)"
            )
        return super().make_spec(args, adapter, calibrated)

    def check(self, spec: MappedSpec, adapter, layer: int) -> None:
        if layer == 0:
            raise KvxError(
                "layer 0 cannot be mapped: the first layers' attention is the model's own (IAM never maps them)"
            )
        if spec.model not in MAPPED_MODELS:
            raise KvxError(
                f"layer {layer}: mapped model must be one of {', '.join(MAPPED_MODELS)} (got {spec.model!r})"
            )
        if adapter.sliding_window(layer) is not None:
            raise KvxError(f"layer {layer} has a local window: mapped layers must be global-attention layers")
        if spec.model == "self" and not 0 <= spec.source < layer:
            raise KvxError(f"layer {layer}: mapped(model=self) needs a source layer below it (got {spec.source})")
        if spec.source < 0:
            raise KvxError(f"layer {layer}: mapped source {spec.source} does not exist")
        if spec.observe < 1:
            raise KvxError(f"layer {layer}: mapped observe must be >= 1 (got {spec.observe})")
        if spec.heads and spec.dynamic:
            raise KvxError(f"layer {layer}: a dynamic map is chosen at each prefill: give no heads")
        if spec.heads and len(spec.heads) != adapter.n_heads:
            raise KvxError(
                f"layer {layer}: mapped heads names {len(spec.heads)} heads, the layer has {adapter.n_heads}"
            )
        if spec.model == "self":
            _check_heads(spec, layer, adapter.n_heads, "this model's")

    def check_plan(self, plan, adapter) -> None:
        for i, spec in _mapped(plan, "self"):
            source = plan.layers[spec.source]
            if source.kind != "full":
                raise KvxError(
                    f"layer {i} borrows layer {spec.source}'s attention, but layer {spec.source} is {source.kind}: "
                    "a source must keep its full attention"
                )

    def prepare(self, plan, adapter, options: dict, tokenizer) -> None:
        """Resolve and check the reference model (config and tokenizer only), describe it in the
        plan, and say what the mapping saves net of the reference's cost."""
        if _mapped(plan, "reference"):
            name = options.get("reference") or (plan.meta.get(REFERENCE_KEY) or {}).get("model")
            if not name:
                raise KvxError(
                    "mapped layers with model=reference need the reference model: --reference SMALL (a smaller "
                    "model of the same family and tokenizer)"
                )
            plan.meta[REFERENCE_KEY] = describe_reference(name, plan, adapter, tokenizer)
        net = net_figures(plan, adapter)
        plan.meta["mapping"] = net
        note(net["summary"])

    def needs(self, spec, calibrated: bool, options: dict | None = None) -> frozenset[str]:
        return frozenset()

    def standalone(self, spec, layer: int) -> bool:
        return False  # its attention is its source's

    def convert_layer(self, spec: MappedSpec, layer: LayerInput) -> LayerOutput:
        if spec.dynamic:  # Q/K kept, to choose the map at each prefill
            return LayerOutput(dict(layer.state))
        dropped = {k: why for k in layer.state for p, why in _DROPPED.items() if k.startswith(p)}
        return LayerOutput({k: v for k, v in layer.state.items() if k not in dropped}, dropped)

    def model_state(self, plan, store, options, progress=no_progress) -> tuple[dict, dict]:
        """The reference model's weights (its layers up to the deepest one referenced)."""
        described = plan.reference()
        if described is None:
            return {}, {}
        from ..loading import load_model

        reference = load_model(described["model"], need_tokenizer=False)[0].model
        keep = described["config"]["num_hidden_layers"]
        state = {
            k: v.detach().clone()
            for k, v in reference.state_dict().items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < keep
        }
        return {f"{REFERENCE}.{k}": v for k, v in state.items()}, {}

    @torch.no_grad()
    def attached_cache_bytes(self, plan, tensors: dict, input_ids: torch.Tensor) -> list[int]:
        """The reference model's cache, measured: its decoder built as the runtime builds it, run once."""
        described = plan.reference()
        if described is None:
            return []
        reference = build_reference(described)
        prefix = f"{REFERENCE}."
        reference.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        cache = make_cache(reference.config)
        reference(input_ids=input_ids, use_cache=True, **cache_kwargs(reference, cache))
        return [layer_nbytes(layer) for layer in cache.layers]

    def trainable(self, spec: MappedSpec, layer: int | None = None) -> tuple[str, ...]:
        return ("v_proj", "o_proj")

    def trainable_elsewhere(self, spec: MappedSpec, layer: int, adapter) -> tuple[str, ...]:
        """With ``train_source``: the source layer's Q/K projections (and norms), in the reference
        model inside the checkpoint or in this model; they change what every reader of that source sees."""
        if not spec.train_source:
            return ()
        where = (
            f"{REFERENCE}.layers.{spec.source}.self_attn."
            if spec.uses_reference
            else adapter.attention_prefix(spec.source)
        )
        return tuple(f"{where}{m}." for m in ATTENTION_MODULES)


def _check_heads(spec: MappedSpec, layer: int, n_source_heads: int, whose: str) -> None:
    bad = [h for h in spec.heads if not 0 <= h < n_source_heads]
    if bad:
        raise KvxError(f"layer {layer}: mapped heads {bad} do not exist in {whose} layer {spec.source} "
                       f"(heads 0..{n_source_heads - 1})")  # fmt: skip


def describe_reference(name: str, plan, adapter, tokenizer) -> dict:
    """What ``config.kvx`` says of the reference: its config cut after the deepest layer referenced,
    its per-layer plan and cache geometry. Refuses, in one line, a reference that cannot serve."""
    from ..arch import get_adapter
    from ..loading import load_source, load_tokenizer
    from ..plan import Plan

    source, shown, config = load_source(name)
    ref = get_adapter(config)
    if config.model_type != adapter.config.model_type:
        raise KvxError(f"--reference {name} is a {config.model_type} model, this one {adapter.config.model_type}")
    if config.vocab_size != adapter.config.vocab_size:
        raise KvxError(
            f"--reference {name} has a vocabulary of {config.vocab_size}, this model {adapter.config.vocab_size}: "
            "both must read the same tokens"
        )
    if tokenizer is not None:
        theirs = load_tokenizer(source, config)
        if theirs is None or theirs.get_vocab() != tokenizer.get_vocab():
            raise KvxError(f"--reference {name} has another tokenizer: both models must read the same tokens")
    ref_plan = Plan.from_config(config)
    mapped = _mapped(plan, "reference")
    for i, spec in mapped:
        if spec.source >= ref.n_layers:
            raise KvxError(
                f"layer {i}: reference layer {spec.source} does not exist ({name} has layers 0..{ref.n_layers - 1})"
            )
        if ref.sliding_window(spec.source) is not None:
            raise KvxError(f"layer {i}: reference layer {spec.source} has a local window: map onto global layers")
        if ref_plan.layers[spec.source].kind != "full":
            raise KvxError(
                f"layer {i}: reference layer {spec.source} is {ref_plan.layers[spec.source].kind}: a layer lends "
                "its attention only with its full attention"
            )
        _check_heads(spec, i, ref.n_heads, f"{name}'s")
    deepest = max(s.source for _, s in mapped)
    layers = ref_plan.layers[: deepest + 1]
    odd = sorted({s.kind for s in layers} - set(REFERENCE_KINDS))
    if odd:
        raise KvxError(f"--reference {name} has {', '.join(odd)} layers: a reference may be full, mla or streaming")
    data = config.to_dict()
    data["num_hidden_layers"] = deepest + 1
    if data.get("layer_types"):
        data["layer_types"] = data["layer_types"][: deepest + 1]
    data["kvx"] = {**(getattr(config, "kvx", None) or {}), "layers": [spec_to_dict(s) for s in layers]}
    geometry = vars(ref.geometry()) | {"layer_types": list(ref.geometry().layer_types[: deepest + 1])}
    described = {
        "model": source if source != shown else name,
        "config": data,
        "sources": sorted({s.source for _, s in mapped}),
        "layers": [spec_to_dict(s) for s in layers],
        "geometry": geometry,
    }
    return json.loads(json.dumps(described))  # plain data: YAML and JSON both write it


def net_figures(plan, adapter) -> dict:
    """KV floats and projection FLOPs per token the mapping saves, net of the reference model's."""
    from ..plan import Plan

    geom = adapter.geometry()
    full = Plan([FullSpec()] * len(plan.layers)).kv_bytes(geom, 1, 1)
    mine = plan.kv_bytes(geom, 1, 1)  # the reference's cache included
    hidden, hd = adapter.config.hidden_size, adapter.head_dim
    mapped = [s for _, s in _mapped(plan)]
    saved_flops = 2 * hidden * hd * (adapter.n_heads + adapter.n_kv_heads) * sum(not s.dynamic for s in mapped)
    described = plan.reference()
    ref_flops = _decoder_flops(described["config"]) if described is not None else 0
    kv_change, flop_change = (
        mine / full - 1,
        (ref_flops - saved_flops) / max(1, _decoder_flops(adapter.config.to_dict())),
    )
    verdict = "saves" if mine < full else "COSTS MORE KV THAN IT SAVES"
    whose = ", the reference model's cache included" if described is not None else ""
    summary = (
        f"mapping {len(mapped)} layers: KV cache {full} -> {mine} floats/token ({kv_change:+.1%}{whose}): it "
        f"{verdict}; matmul FLOPs/token {flop_change:+.1%} of the model's (reference forward "
        f"{ref_flops / 1e6:.2f} M, Q/K projections skipped {saved_flops / 1e6:.2f} M; attention itself not counted)"
    )
    return {"kv_floats_per_token": mine, "full_kv_floats_per_token": full, "kv_change": kv_change,
            "flop_change": flop_change, "summary": summary}  # fmt: skip


def _decoder_flops(c: dict) -> int:
    """About the matmul FLOPs per token of a model's decoder layers (2 x their weights), from its config."""
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    attn = c["hidden_size"] * hd * 2 * (c["num_attention_heads"] + c["num_key_value_heads"])
    return 2 * c["num_hidden_layers"] * (attn + 3 * c["hidden_size"] * c["intermediate_size"])
