"""The interface every kvx method implements: one class per spec kind, one line in the registry.

A method knows everything about its kind that is not runtime: how a spec is written on the
command line and in recipes, what makes a spec impossible for a model (checked once, before
any work), what must be measured first, how one layer's weights become the runtime's
weights (a pure function of tensors), and which of those weights distillation trains. The
stages (convert, distill, eval, the CLI, recipes) ask the registry and never name a kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..errors import KvxError
from ..progress import no_progress


@dataclass(frozen=True)
class Option:
    """A shortcut for one spec field on the command line and in recipes (``--kv-rank 60``)."""

    type: Any  # what typer and the recipe checker accept, e.g. ``str`` or ``int``
    help: str


@dataclass
class LayerInput:
    """What a method sees of one base layer: its attention tensors and what was measured.

    ``state``: the base attention module's parameters and persistent buffers by their names
    inside the module (``q_proj.weight``, ...), float32. ``weights``: the same q/k/v as the
    arch adapter reads them. ``k_gain``: the effective gain of a per-head key norm (None:
    the family has none). ``stats``: calibration statistics, if the method asked for them."""

    index: int
    state: dict[str, torch.Tensor]
    weights: Any  # arch.AttentionWeights
    adapter: Any  # arch.ArchAdapter
    k_gain: torch.Tensor | None = None
    stats: Any = None  # calibration.LayerStats
    options: dict = field(default_factory=dict)  # the method's conversion options (``Method.conversion_options``)
    plan: list | None = None  # every layer's spec, for methods whose layers depend on others
    peer: Any = None  # ``peer(j)``: layer j's attention state, as ``state`` (cross-layer methods read it)

    @classmethod
    def read(
        cls, adapter, model, index: int, stats=None, options: dict | None = None, plan=None, peer=None
    ) -> LayerInput:
        """Layer ``index`` of ``model`` as its method sees it."""
        state = adapter.attention_state(model, index)
        weights, gain = adapter.attention_weights(state), adapter.k_norm_weight(state)
        peer = peer or (lambda j: adapter.attention_state(model, j))
        return cls(index, state, weights, adapter, gain, stats, options or {}, plan, peer)


@dataclass
class LayerOutput:
    """One converted layer: the attention module's complete state by runtime parameter name,
    every base tensor not carried over with the reason why, and figures for the summary."""

    state: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class: a method whose layers keep the base attention (what ``full`` does)."""

    kind: ClassVar[str]
    spec_type: ClassVar[type]
    options: ClassVar[dict[str, Option]] = {}  # shortcuts for the spec's fields
    conversion_options: ClassVar[dict[str, Option]] = {}  # how to convert, not what the layer is (not in the spec)
    layer_score: ClassVar[str | None] = None  # measurement that picks layers for --layers auto / 0.25
    auto_fraction: ClassVar[float | None] = None  # share of layers --layers auto picks
    tags: ClassVar[tuple[str, ...]] = ()  # model-card tags

    # -- specs from text

    def split_options(self, args: dict) -> tuple[dict, dict]:
        """``args`` -> (the spec's arguments, the conversion options)."""
        conv = {k: v for k, v in args.items() if k in self.conversion_options}
        return {k: v for k, v in args.items() if k not in conv}, conv

    def make_spec(self, args: dict, adapter, calibrated: bool):
        """A spec from ``--to KIND(args)`` / shortcut options; placeholders resolved for ``adapter``."""
        allowed = {f.name for f in fields(self.spec_type)}
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise KvxError(
                f"{self.kind} has no option {', '.join(unknown)} (it takes: {', '.join(sorted(allowed)) or 'none'})"
            )
        try:
            return self.spec_type(**args)
        except TypeError as e:
            raise KvxError(f"bad {self.kind} spec {args}: {e}") from None

    # -- validation, once, before any work

    def check(self, spec, adapter, layer: int) -> None:
        """Raise ``KvxError`` (one line, naming the layer) if ``spec`` cannot run in ``layer``."""

    def check_plan(self, plan, adapter) -> None:
        """Raise ``KvxError`` if the plan's layers of this kind cannot run together (one layer
        reading another's cache, say); called once per kind present, after every ``check``."""

    def prepare(self, plan, adapter, options: dict, tokenizer) -> None:
        """Check (and record in ``plan.meta``) what the kind needs from outside the model, such as
        a second model, before any work; called once per kind present, after ``check_plan``.
        ``tokenizer``: the model's (None for in-memory conversions)."""

    def standalone(self, spec, layer: int) -> bool:
        """Whether the layer's attention runs on its own input alone (layer-at-a-time conversion
        measures and fits only such layers; a layer that reads another layer's cache cannot)."""
        return True

    def needs(self, spec, calibrated: bool, options: dict | None = None) -> frozenset[str]:
        """What must be measured before converting a layer: ``calibration`` (input statistics).
        ``options``: the conversion options given (checked here, before any work)."""
        return frozenset()

    # -- the weight transform (pure: tensors in, tensors out)

    def convert_layer(self, spec, layer: LayerInput) -> LayerOutput:
        return LayerOutput(dict(layer.state))

    def convert_candidates(self, spec, layer: LayerInput) -> dict[str, LayerOutput]:
        """Initialisations worth trying, by label; layer-at-a-time conversion keeps the one whose
        attention output is closest to the base layer's on held-out calibration text."""
        return {"default": self.convert_layer(spec, layer)}

    # -- model-level state (one per model, shared by the kind's layers)

    def observe(self, spec, layer: LayerInput, attn, xs: list, kwargs: list, store: dict) -> None:
        """Record into ``store`` what ``model_state`` learns from: layer ``layer.index``'s base
        attention ``attn`` and its calibration inputs (``xs``, the call arguments ``kwargs``,
        batch by batch). Called for every layer of the kind during calibrated conversion."""

    def model_state(self, plan, store: dict | None, options: dict, progress=no_progress) -> tuple[dict, dict]:
        """Tensors outside the decoder layers that the kind's runtime needs once per model (by
        checkpoint name), built from what ``observe`` recorded (``store`` None: nothing was,
        an in-memory conversion), and figures for the plan's conversion record. ``progress``
        makes a bar for anything slow (``progress(description, total)``)."""
        return {}, {}

    def attached_cache_bytes(self, plan, tensors: dict, input_ids: torch.Tensor) -> list[int]:
        """Bytes per layer of the caches of models the kind runs beside the converted one (a
        reference model, built from its ``model_state`` ``tensors``), measured on ``input_ids``."""
        return []

    # -- distillation

    def trainable(self, spec, layer: int | None = None) -> tuple[str, ...]:
        """Modules inside the layer's attention that ``kvx distill --train converted`` trains:
        the weights the conversion created (nothing for a layer that kept its weights)."""
        return ()

    def trainable_elsewhere(self, spec, layer: int, adapter) -> tuple[str, ...]:
        """Parameter-name prefixes outside the layer's own attention that distillation trains for it
        (the attention a mapped layer borrows: its source's Q/K projections), as full names."""
        return ()
