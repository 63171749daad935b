"""The per-layer plan: the one thing that travels between kvx steps besides weights.

A plan is a list of layer specs, one per decoder layer. Each spec knows how many
floats its layer caches per token, which makes it the single source of truth that
``kvx eval`` checks against the real cache object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Union

import yaml

from .errors import KvxError


@dataclass(frozen=True)
class FullSpec:
    """The base model's attention, untouched: K and V of every KV head."""

    kind: ClassVar[str] = "full"

    def cached_floats(self, geom: "CacheGeometry") -> int:
        return 2 * geom.n_kv_heads * geom.head_dim


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

    def cached_floats(self, geom: "CacheGeometry") -> int:
        return self.kv_rank + self.rope_dims + (geom.n_kv_heads if geom.k_norm else 0)


@dataclass(frozen=True)
class StreamingSpec:
    """Attention sinks + a recent window (LightTransfer / StreamingLLM): K/V of the first
    ``sink`` and the last ``window`` tokens only. Planned by ``kvx profile``; the runtime
    that converts to it is not built yet."""

    sink: int = 4
    window: int = 1020
    kind: ClassVar[str] = "streaming"

    def cached_floats(self, geom: "CacheGeometry") -> int:
        return 2 * geom.n_kv_heads * geom.head_dim

    def cached_tokens(self, n_tokens: int) -> int:
        return min(n_tokens, self.sink + self.window)


LayerSpec = Union[FullSpec, MLASpec, StreamingSpec]
SPEC_TYPES: dict[str, type] = {"full": FullSpec, "mla": MLASpec, "streaming": StreamingSpec}


@dataclass(frozen=True)
class CacheGeometry:
    """What the base architecture fixes about the cache (from the arch adapter)."""

    n_kv_heads: int
    head_dim: int
    k_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()


def spec_to_dict(spec: LayerSpec) -> dict:
    return {"kind": spec.kind, **asdict(spec)}


def spec_from_dict(d: dict) -> LayerSpec:
    d = dict(d)
    kind = d.pop("kind", None)
    d.pop("absorb", None)  # runtime-only switch
    if kind not in SPEC_TYPES:
        raise KvxError(f"unknown layer spec kind {kind!r} (known: {', '.join(SPEC_TYPES)})")
    try:
        return SPEC_TYPES[kind](**d)
    except TypeError as e:
        raise KvxError(f"bad {kind} spec {d}: {e}") from None


@dataclass
class Plan:
    """One spec per decoder layer, plus the model it was made for."""

    layers: list[LayerSpec]
    base_model: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def all_full(cls, n_layers: int, base_model: str | None = None) -> "Plan":
        return cls([FullSpec()] * n_layers, base_model)

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "layers": [spec_to_dict(s) for s in self.layers], **self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        if "layers" not in d:
            raise KvxError("a plan needs a 'layers' list")
        layers = [spec_from_dict(s) for s in d.pop("layers")]
        base = d.pop("base_model", None)
        return cls(layers, base, d)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """A plan from a YAML file (``plan.yaml``, a recipe's plan)."""
        p = Path(path)
        if not p.is_file():
            raise KvxError(f"plan file not found: {path}")
        try:
            return cls.from_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise KvxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_config(cls, config) -> "Plan":
        """The plan stored in a converted model's config; all-full for a plain model."""
        meta = getattr(config, "kvx", None)
        if not meta:
            return cls.all_full(config.num_hidden_layers, getattr(config, "_name_or_path", None))
        return cls.from_dict({k: v for k, v in meta.items() if k != "k_norm_eps"})

    def layer_kv_bytes(self, geom: CacheGeometry, n_tokens: int, dtype_bytes: int) -> list[int]:
        """Bytes each layer's cache holds after ``n_tokens`` tokens (batch 1), sliding windows included."""
        out = []
        for i, spec in enumerate(self.layers):
            kept = spec.cached_tokens(n_tokens) if isinstance(spec, StreamingSpec) else n_tokens
            if geom.layer_types and geom.layer_types[i] == "sliding_attention" and geom.sliding_window:
                kept = min(kept, geom.sliding_window - 1)
            out.append(spec.cached_floats(geom) * kept * dtype_bytes)
        return out

    def kv_bytes(self, geom: CacheGeometry, n_tokens: int, dtype_bytes: int) -> int:
        """Bytes the whole cache holds after ``n_tokens`` tokens (batch 1)."""
        return sum(self.layer_kv_bytes(geom, n_tokens, dtype_bytes))

    def summary(self) -> str:
        """``30 layers: 30 mla(kv_rank=60, rope_dims=36)``; uneven ranks show as a range."""
        groups: dict[str, list[int]] = {}
        for s in self.layers:
            if isinstance(s, MLASpec):
                groups.setdefault(f"mla|{s.rope_dims}" + (f", layout={s.layout}" if s.layout != "kvx" else ""), []).append(s.kv_rank)
            elif isinstance(s, StreamingSpec):
                groups.setdefault(f"streaming(sink={s.sink}, window={s.window})", []).append(0)
            else:
                groups.setdefault(s.kind, []).append(0)
        parts = []
        for key, ranks in groups.items():
            if key.startswith("mla|"):
                lo, hi = min(ranks), max(ranks)
                rank = str(lo) if lo == hi else f"{lo}..{hi}"
                key = f"mla(kv_rank={rank}, rope_dims={key[4:]})"
            parts.append(f"{len(ranks)} {key}")
        return f"{len(self.layers)} layers: " + ", ".join(parts)
