"""The per-layer plan: the one thing that travels between kvx steps besides weights.

A plan is a list of layer specs, one per decoder layer. The specs live in the runtime's
``kvx_specs.py`` (the same dataclasses are shipped in every checkpoint); each knows how many
floats its layer caches per token, which makes the plan the single source of truth that
``kvx eval`` checks against the real cache object. Specs are written as text the way
``Plan.summary()`` prints them: ``mla(kv_rank=60, rope_dims=36)``, ``streaming(sink=4, window=1020)``.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import KvxError
from .modeling import kvx_specs
from .modeling.kvx_specs import (
    SPEC_TYPES,
    CacheGeometry,
    CondensedSpec,
    EvictSpec,
    FullSpec,
    LayerSpec,
    MappedSpec,
    MLASpec,
    StreamingSpec,
)

__all__ = [
    "SPEC_TYPES",
    "CacheGeometry",
    "CondensedSpec",
    "EvictSpec",
    "FullSpec",
    "LayerSpec",
    "MappedSpec",
    "MLASpec",
    "Plan",
    "StreamingSpec",
    "parse_layers",
    "parse_spec",
    "spec_from_dict",
    "spec_string",
    "spec_to_dict",
]

spec_to_dict = kvx_specs.spec_to_dict


def spec_from_dict(d: dict) -> LayerSpec:
    try:
        return kvx_specs.spec_from_dict(d)
    except kvx_specs.SpecError as e:
        raise KvxError(str(e)) from None


# --------------------------------------------------------------------------- specs as text

_SPEC_TEXT = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?\s*$")


def _value(text: str):
    text = text.strip().strip("'\"")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_spec(text: str) -> tuple[str, dict]:
    """``"mla(kv_rank=60, rope_dims=36)"`` -> ``("mla", {"kv_rank": 60, "rope_dims": 36})``; ``"mla"`` -> no args."""
    m = _SPEC_TEXT.match(text or "")
    if not m:
        raise KvxError(
            f"bad spec {text!r}: write it as KIND or KIND(name=value, ...), e.g. 'mla(kv_rank=60, rope_dims=36)'"
        )
    args = {}
    for part in filter(str.strip, (m.group(2) or "").split(",")):
        if "=" not in part:
            raise KvxError(f"bad spec {text!r}: {part.strip()!r} is not name=value")
        name, value = part.split("=", 1)
        args[name.strip()] = _value(value)
    return m.group(1), args


def _shown(spec) -> list[tuple[str, object]]:
    """Fields a spec string shows: those without a default, and the others where they differ from it."""
    out = []
    for f in fields(spec):
        value = getattr(spec, f.name)
        if f.default is MISSING or value != f.default or f.name in getattr(spec, "always_shown", ()):
            out.append((f.name, value))
    return out


def spec_string(spec) -> str:
    """The spec as ``parse_spec`` reads it back."""
    shown = [(k, "/".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in _shown(spec)]
    return spec.kind + (f"({', '.join(f'{k}={v}' for k, v in shown)})" if shown else "")


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``None``/``all`` -> every layer; ``0,2,5-9`` -> those layers (negative counts from the end)."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.update(range(int(lo), int(hi) + 1))
            else:
                i = int(part)
                out.add(i + n_layers if i < 0 else i)
    except ValueError:
        raise KvxError(f"bad --layers {spec!r}: use e.g. '0,2,5-9' or 'all'") from None
    bad = sorted(i for i in out if not 0 <= i < n_layers)
    if bad or not out:
        raise KvxError(f"--layers {spec!r} names layers outside 0..{n_layers - 1}")
    return sorted(out)


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """One spec per decoder layer, plus the model it was made for."""

    layers: list[LayerSpec]
    base_model: str | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def all_full(cls, n_layers: int, base_model: str | None = None) -> Plan:
        return cls([FullSpec()] * n_layers, base_model)

    def to_dict(self) -> dict:
        return {"base_model": self.base_model, "layers": [spec_to_dict(s) for s in self.layers], **self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
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
    def from_yaml(cls, text: str) -> Plan:
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """A plan from a YAML file (``plan.yaml``, a recipe's plan)."""
        p = Path(path)
        if not p.is_file():
            raise KvxError(f"plan file not found: {path}")
        try:
            return cls.from_yaml(p.read_text())
        except yaml.YAMLError as e:
            raise KvxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_config(cls, config) -> Plan:
        """The plan stored in a converted model's config; all-full for a plain model."""
        meta = getattr(config, "kvx", None)
        if not meta:
            return cls.all_full(config.num_hidden_layers, getattr(config, "_name_or_path", None))
        return cls.from_dict({k: v for k, v in meta.items() if k != "k_norm_eps"})

    def kinds(self) -> set[str]:
        return {s.kind for s in self.layers}

    def layer_kv_bytes(self, geom: CacheGeometry, n_tokens: int, dtype_bytes: int) -> list[int]:
        """Bytes each layer's cache holds after ``n_tokens`` tokens (batch 1), sliding windows included."""
        out = []
        for i, spec in enumerate(self.layers):
            kept = spec.cached_tokens(n_tokens)
            if geom.layer_types and geom.layer_types[i] == "sliding_attention" and geom.sliding_window:
                kept = min(kept, geom.sliding_window - 1)
            out.append(spec.cached_floats(geom, i) * kept * dtype_bytes)
        return out

    def reference(self) -> dict | None:
        """The reference model that mapped layers borrow attention from (``meta["reference"]``:
        its name, config, per-layer plan and cache geometry), or None when no layer does."""
        if not any(getattr(s, "uses_reference", False) for s in self.layers):
            return None
        return self.meta.get("reference")

    def reference_kv_bytes(self, n_tokens: int, dtype_bytes: int) -> list[int]:
        """Bytes each layer of the reference model's cache holds after ``n_tokens`` tokens (batch 1):
        the reference runs in lockstep, so its cache is part of what the plan costs."""
        ref = self.reference()
        if ref is None or "layers" not in ref:
            return []
        geom = CacheGeometry(**{**ref["geometry"], "layer_types": tuple(ref["geometry"].get("layer_types", ()))})
        return Plan([spec_from_dict(d) for d in ref["layers"]]).layer_kv_bytes(geom, n_tokens, dtype_bytes)

    def kv_bytes(self, geom: CacheGeometry, n_tokens: int, dtype_bytes: int) -> int:
        """Bytes the whole cache holds after ``n_tokens`` tokens (batch 1), a reference model's included."""
        return sum(self.layer_kv_bytes(geom, n_tokens, dtype_bytes)) + sum(
            self.reference_kv_bytes(n_tokens, dtype_bytes)
        )

    def summary(self) -> str:
        """``30 layers: 30 mla(kv_rank=60, rope_dims=36)``. Layers alike but for their first
        numeric field (uneven MLA ranks) are one group, shown with that field's range."""
        groups: dict[tuple, list] = {}
        for s in self.layers:
            shown = _shown(s)
            vary = next((i for i, (_, v) in enumerate(shown) if isinstance(v, int) and not isinstance(v, bool)), None)
            key = (s.kind, vary, tuple(kv for i, kv in enumerate(shown) if i != vary))
            groups.setdefault(key, []).append(shown)
        parts = []
        for (kind, vary, _), members in groups.items():
            shown = list(members[0])
            if vary is not None:
                values = [m[vary][1] for m in members]
                lo, hi = min(values), max(values)
                shown[vary] = (shown[vary][0], lo if lo == hi else f"{lo}..{hi}")
            text = kind + (f"({', '.join(f'{k}={v}' for k, v in shown)})" if shown else "")
            parts.append(f"{len(members)} {text}")
        return f"{len(self.layers)} layers: " + ", ".join(parts)
