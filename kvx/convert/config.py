"""``kvx convert``'s config: the target spec, which layers get it, calibration, exports."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..config import accepts, also_trainable, config_fields, opt, type_name
from ..errors import KvxError
from ..methods import DEFAULT_TARGET, get_method, shortcut_options
from ..plan import parse_spec

CALIB_INPUTS = ("original", "converted")


@dataclass(frozen=True)
class ConvertConfig:
    """What to convert into. ``to`` is a spec (``mla``, ``streaming``, or
    ``mla(kv_rank=60, rope_dims=36)``) for the ``layers`` chosen, the others stay full; ``plan``
    instead gives every layer its own spec. ``options`` holds the methods' shortcut options
    (``--kv-rank 60``, ``--sink 4``): the CLI and recipes fill it from their own keys."""

    to: str = opt(
        DEFAULT_TARGET,
        "Target spec for the chosen layers: a kind (mla, streaming) or a spec like 'mla(kv_rank=60, rope_dims=36)' "
        "or 'condensed(source=29)' or 'evict(budget=1024, policy=h2o)'.",
    )
    layers: str | None = opt(
        None,
        "Layers to convert, e.g. '0-9,20' (default: all, or 'auto' where the method picks its own); "
        "'auto' or a fraction like 0.25 lets a method with a layer score (streaming: the laziest) choose.",
    )
    plan: str | None = opt(
        None, "A per-layer plan (plan.yaml from kvx profile) instead of --to/--layers and the options."
    )
    calib: str = opt(
        "teacher+bundled",
        "Calibration text (as --data), 'teacher' (text the model writes itself, cached), a mix such as "
        "'teacher+bundled' (the default: it generalised best), or 'none' for weights-only conversion.",
    )
    calib_tokens: int = opt(16384, "Calibration tokens.")
    calib_seq_len: int = opt(512, "Calibration window length (tokens).")
    calib_inputs: str = opt(
        "original",
        "What each layer is calibrated on, a layer at a time: 'original' (the original model's hidden states) or "
        "'converted' (those of the layers already converted, so each layer corrects the errors below it).",
    )
    fit_steps: int = opt(
        300,
        "Layer-wise fitting: Adam steps per converted layer on its new weights (and --fit-also), towards the "
        "original attention output on the calibration text (0: none). Never leaves a layer worse than its "
        "initialisation on held-out text.",
    )
    fit_lr: float = opt(
        1e-3, "Learning rate of the layer-wise fitting (halved for a layer whose held-out error rises)."
    )
    fit_also: str = opt(
        "q_proj,o_proj",
        "Original projections of each fitted layer that the fitting trains too, comma-separated: q_proj (the "
        "queries learn to read the compressed keys), o_proj; 'none' for the new weights alone.",
    )
    export: str | None = opt(
        None,
        "Also write OUT-native or OUT-deepseek: 'native' = base weights + transformers layer_types (full + sink-free "
        "streaming plans, Qwen2/Qwen3); 'deepseek' = DeepseekV3ForCausalLM (all-MLA, implies --layout deepseek).",
    )
    options: dict = opt({}, "Method shortcut options by name (kv_rank, rope_dims, sink, ...).", cli=False)

    def fit_modules_also(self) -> tuple[str, ...]:
        """``--fit-also`` as names, in the order given."""
        return also_trainable(self.fit_also, "--fit-also")

    @property
    def calibrated(self) -> bool:
        return self.calib.lower() != "none"

    def target(self) -> tuple[str, dict]:
        """The target kind and its arguments: the spec string's, plus the shortcut options given
        (each must belong to that kind, and may not contradict the spec string)."""
        kind, args = parse_spec(self.to)
        get_method(kind)
        owners = shortcut_options()
        for name, value in self.options.items():
            if value is None:
                continue
            owner = owners.get(name, (None,))[0]
            if owner != kind:
                flag = "--" + name.replace("_", "-")
                raise KvxError(f"{flag} is {'an option of ' + owner if owner else 'not an option'}, not of --to {kind}")
            if name in args and str(args[name]) != str(value):
                raise KvxError(f"--to {self.to!r} sets {name}={args[name]} but --{name.replace('_', '-')} says {value}")
            args[name] = value
        return kind, args

    def check(self) -> None:
        """What can be checked without the model: the spec's syntax, its kind, who owns each option."""
        if self.calib_inputs not in CALIB_INPUTS:
            raise KvxError(f"--calib-inputs {self.calib_inputs!r}: choose {' or '.join(CALIB_INPUTS)}")
        if self.fit_steps < 0 or self.fit_lr <= 0:
            raise KvxError(f"--fit-steps must be >= 0 and --fit-lr > 0 (got {self.fit_steps}, {self.fit_lr})")
        self.fit_modules_also()
        if self.plan is not None:
            owners = shortcut_options()
            given = ["--to"] * (self.to != DEFAULT_TARGET) + ["--layers"] * (self.layers is not None)
            given += sorted(
                "--" + k.replace("_", "-")
                for k, v in self.options.items()
                if v is not None and k not in get_method(owners[k][0]).conversion_options
            )
            if given:
                raise KvxError(f"--plan sets every layer: drop {', '.join(given)}")
            return
        self.target()

    def conversion_options(self) -> dict[str, dict]:
        """The methods' conversion options given, by kind (with a plan they apply to every layer of that kind)."""
        owners = shortcut_options()
        out: dict[str, dict] = {}
        for name, value in self.options.items():
            kind = owners[name][0]
            if value is not None and name in get_method(kind).conversion_options:
                out.setdefault(kind, {})[name] = value
        return out

    @classmethod
    def from_mapping(cls, data: dict, where: str) -> ConvertConfig:
        """A recipe's ``convert:`` mapping: this config's keys, plus the methods' shortcut keys."""
        owners = shortcut_options()
        own = {f.name: hint for f, hint in config_fields(cls) if f.name != "options"}
        options: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in own:
                if not accepts(own[key], value):
                    raise KvxError(f"{where}.{key}: {value!r} is not {type_name(own[key])}")
                kwargs[key] = value
            elif key in owners:
                option = owners[key][1]
                if not (accepts(option.type, value) or (option.type is str and accepts(int, value))):
                    raise KvxError(f"{where}.{key}: {value!r} is not {type_name(option.type)}")
                options[key] = value
            else:
                known = ", ".join(sorted([*own, *owners]))
                raise KvxError(f"{where}: unknown key(s) {key} (known: {known})")
        config = cls(**kwargs, options=options)
        try:
            config.check()
        except KvxError as e:
            raise KvxError(f"{where}: {e}") from None
        return config

    @classmethod
    def make(cls, **kwargs) -> ConvertConfig:
        """From keyword arguments that mix this config's fields and shortcut options (library use)."""
        names = {f.name for f in dataclasses.fields(cls)}
        options = {**kwargs.pop("options", {}), **{k: kwargs.pop(k) for k in list(kwargs) if k not in names}}
        unknown = sorted(set(options) - set(shortcut_options()))
        if unknown:
            raise TypeError(f"unknown convert option(s): {', '.join(unknown)}")
        return cls(**kwargs, options=options)


FRACTION = re.compile(r"0?\.\d+")


def layer_fraction(layers: str | None, method) -> float | None:
    """The share of layers ``--layers`` asks a scoring method to pick (``auto``: its own), or None."""
    if layers is None and method.auto_fraction is not None:
        layers = "auto"
    if layers == "auto":
        if method.layer_score is None:
            raise KvxError(f"--layers auto: {method.kind} has no layer score to choose by; list the layers")
        return method.auto_fraction
    if layers is not None and FRACTION.fullmatch(layers):
        if method.layer_score is None:
            raise KvxError(f"--layers {layers}: {method.kind} has no layer score to choose by; list the layers")
        if float(layers) <= 0:
            raise KvxError(f"--layers {layers}: a fraction must be above 0")
        return float(layers)
    return None


def top_layers(scores: list[float], fraction: float) -> list[int]:
    """The ``fraction`` of layers with the highest scores (at least one), in layer order."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(ranked[: max(1, round(fraction * len(scores)))])
