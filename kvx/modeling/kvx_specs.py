"""Layer specs: what one decoder layer of a kvx model is, and how many floats it caches per token.

Shipped inside every checkpoint (next to ``modeling_kvx.py``) and imported by kvx itself, so
the library and the runtime read the same dataclasses with the same defaults. Imports only
the standard library. A new method adds its spec here and one line to ``SPEC_TYPES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar


class SpecError(ValueError):
    """A spec dict that names an unknown kind or has bad fields (kvx shows it as one line)."""


@dataclass(frozen=True)
class CacheGeometry:
    """What the base architecture fixes about the cache (from kvx's arch adapter)."""

    n_kv_heads: int
    head_dim: int
    k_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class FullSpec:
    """The base model's attention, untouched: K and V of every KV head."""

    kind: ClassVar[str] = "full"

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        return 2 * geom.n_kv_heads * geom.head_dim

    def cached_tokens(self, n_tokens: int) -> int:
        return n_tokens


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (X-EcoMLA / MHA2MLA / TransMLA upcycling).

    ``kv_rank``: latent floats per token. ``rope_dims``: RoPE key floats per token, all KV
    heads together (2 per kept frequency pair per KV head). ``rope_select``: how the pairs
    were chosen. Families with per-head key RMS norms also cache one scale per KV head.
    ``layout``: ``kvx`` (a RoPE key per KV head, MHA2MLA-style), ``shared`` (one RoPE key of
    ``rope_dims`` for all heads, TransMLA-style) or ``deepseek`` (shared, plus an RMS norm on
    the latent: DeepSeek-V3's attention, exportable with ``kvx export --format deepseek``).
    """

    kv_rank: int
    rope_dims: int
    rope_select: str = "2norm"
    layout: str = "kvx"
    kind: ClassVar[str] = "mla"

    @property
    def shared(self) -> bool:
        """One RoPE key for all heads (the shared and deepseek layouts)."""
        return self.layout in ("shared", "deepseek")

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        return self.kv_rank + self.rope_dims + (geom.n_kv_heads if geom.k_norm else 0)

    def cached_tokens(self, n_tokens: int) -> int:
        return n_tokens


@dataclass(frozen=True)
class StreamingSpec:
    """Attention sinks + a recent window (LightTransfer / StreamingLLM): K/V of the first
    ``sink`` and the last ``window`` tokens only."""

    sink: int = 4
    window: int = 1020
    kind: ClassVar[str] = "streaming"
    always_shown: ClassVar[tuple[str, ...]] = ("sink", "window")  # in spec strings, defaults or not

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        return 2 * geom.n_kv_heads * geom.head_dim

    def cached_tokens(self, n_tokens: int) -> int:
        return min(n_tokens, self.sink + self.window)


@dataclass(frozen=True)
class CondensedSpec:
    """Layer-condensed KV (LCKV, Wu & Tu 2024; cross-layer attention, Brandon et al. 2024): the
    layer attends to the K/V of layer ``source``. A layer that is its own source computes and
    caches K/V, for itself and for the layers that read it; any other keeps no K/V projections
    and caches nothing. A source below the layer needs nothing special. A source above it
    (LCKV proper) has not run yet when the layer does: a token sees the source's K/V of the
    tokens before it only, and a prompt is prefilled by iterating the model, ``passes`` times
    without gradient and then ``grad_passes`` times (with gradient when training), each pass
    reading the K/V the previous one computed (the first reads zeros).
    ``train_q``: distillation trains the reader's query projection too."""

    source: int
    passes: int = 7
    grad_passes: int = 2
    train_q: bool = False
    kind: ClassVar[str] = "condensed"
    always_shown: ClassVar[tuple[str, ...]] = ("source",)

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        if layer is None:
            raise ValueError("a condensed layer's cache depends on its index: pass layer=")
        return 2 * geom.n_kv_heads * geom.head_dim if layer == self.source else 0

    def cached_tokens(self, n_tokens: int) -> int:
        return n_tokens


POLICIES = ("recent", "h2o", "snapkv", "previous", "predictor")  # how an evicting layer scores its blocks


@dataclass(frozen=True)
class EvictSpec:
    """Critical-token KV eviction at a fixed budget (AttentionPredictor, Yang et al. 2025; H2O,
    Zhang et al. 2023; SnapKV, Li et al. 2024; StreamingLLM, Xiao et al. 2023, as policies).

    The layer's cache holds at most ``budget`` tokens: the first ``sink``, the last ``local`` and
    whole blocks of ``block`` tokens in between, chosen by ``policy``: ``recent`` (the newest
    blocks: StreamingLLM), ``h2o`` (attention received so far, summed), ``snapkv`` (attention of
    the prompt's last ``observe`` queries; blocks written while decoding leave oldest first) or
    ``previous`` (the last step's attention: AttentionPredictor's untrained baseline) or
    ``predictor`` (AttentionPredictor: a small CNN, trained at conversion and carried in the
    checkpoint, reads the last ``history`` steps' block-pooled attention and predicts the next).
    Once full, each new block takes the slots of the block its policy scores lowest, so the
    cache is exactly ``budget`` tokens from then on (slots of the block being written count as
    held). ``offload``: every token's K/V is also kept in a second store off the compute device
    (CPU RAM); the budget's slots are re-chosen from all stored blocks at each new block and
    fetched from it, and every ``refresh`` steps a dense pass over the store refreshes the
    scores. The compute device then holds ``budget`` tokens; nothing is lost, only not attended."""

    budget: int = 1024
    sink: int = 64
    local: int = 64
    block: int = 16
    policy: str = "h2o"
    observe: int = 32
    history: int = 64
    offload: bool = False
    refresh: int = 5
    kind: ClassVar[str] = "evict"
    always_shown: ClassVar[tuple[str, ...]] = ("budget", "policy")

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        return 2 * geom.n_kv_heads * geom.head_dim

    def cached_tokens(self, n_tokens: int) -> int:
        return min(n_tokens, self.budget)


MAPPED_MODELS = ("reference", "self")  # whose attention a mapped layer borrows


@dataclass(frozen=True)
class MappedSpec:
    """Attention mapping (IAM, Zhao et al. 2025): the layer borrows the attention probabilities
    of layer ``source`` of a smaller reference model of the same family run in lockstep on the
    same tokens (``model="reference"``), or of an earlier layer of this model (``"self"``:
    cross-layer attention sharing, no second model). It keeps its V and O projections and
    caches V only; no Q/K projections, no K cache. ``heads``: for each of its query heads, the
    source's query head whose probabilities it takes (empty: head ``h`` takes source head
    ``h * source_heads // heads``, the identity when the counts match). ``dynamic``: the map is
    chosen afresh at each prefill, as IAM does (the layer keeps its Q/K projections to compare
    its own attention of the prompt's last ``observe`` queries with every source head's, and
    caches nothing of K); decoding reuses it. ``train_source``: distillation also trains the
    source layer's Q/K projections (the attention it lends, to every layer that reads it)."""

    source: int
    model: str = "reference"
    heads: tuple[int, ...] = ()
    dynamic: bool = False
    observe: int = 64
    train_source: bool = False
    kind: ClassVar[str] = "mapped"
    always_shown: ClassVar[tuple[str, ...]] = ("source", "model")

    def __post_init__(self):
        heads = self.heads
        if isinstance(heads, str):  # from spec text: heads=3/1/0/2
            heads = [h for h in heads.replace(",", "/").split("/") if h.strip()]
        elif isinstance(heads, int):
            heads = [heads]
        object.__setattr__(self, "heads", tuple(int(h) for h in (heads or ())))

    @property
    def uses_reference(self) -> bool:
        """The layer needs a second model run beside this one (whose cache the plan counts)."""
        return self.model == "reference"

    def cached_floats(self, geom: CacheGeometry, layer: int | None = None) -> int:
        return geom.n_kv_heads * geom.head_dim

    def cached_tokens(self, n_tokens: int) -> int:
        return n_tokens


LayerSpec = FullSpec | MLASpec | StreamingSpec | CondensedSpec | EvictSpec | MappedSpec
SPEC_TYPES: dict[str, type] = {
    "full": FullSpec,
    "mla": MLASpec,
    "streaming": StreamingSpec,
    "condensed": CondensedSpec,
    "evict": EvictSpec,
    "mapped": MappedSpec,
}
RUNTIME_ONLY_KEYS = ("absorb",)  # switches of the runtime, not part of a spec


def spec_to_dict(spec) -> dict:
    """The spec as plain data (tuples as lists: YAML and JSON both read those back)."""
    return {"kind": spec.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}}


def spec_from_dict(d: dict):
    """A spec from its dict (``config.json``, YAML); runtime-only keys are ignored."""
    d = {k: v for k, v in d.items() if k not in RUNTIME_ONLY_KEYS}
    kind = d.pop("kind", None)
    if kind not in SPEC_TYPES:
        raise SpecError(f"unknown layer spec kind {kind!r} (known: {', '.join(SPEC_TYPES)})")
    cls = SPEC_TYPES[kind]
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise SpecError(f"bad {kind} spec {d}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise SpecError(f"bad {kind} spec {d}: {e}") from None
