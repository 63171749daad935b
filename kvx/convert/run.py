"""``kvx convert``: a plan from the config (or a plan file), checked once, measured, converted
layer by layer through each spec's method, assembled, written atomically, exported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..arch import get_adapter
from ..checkpoint import check_output, save_checkpoint
from ..data import token_windows
from ..errors import KvxError
from ..export import check_export, run_export
from ..hub import model_card
from ..loading import load_model
from ..measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
from ..methods import get_method, method_of
from ..plan import FullSpec, Plan, parse_layers, spec_string
from ..progress import Progress, no_progress
from .assemble import assemble, convert_model
from .config import ConvertConfig, layer_fraction, top_layers
from .scores import LAYER_SCORES
from .sequential import FitSettings, sequential_convert


def _plan_from_target(cfg: ConvertConfig, base, tokenizer, adapter, name, progress) -> tuple[Plan, str]:
    kind, args = cfg.target()
    method = get_method(kind)
    args = {**check_export(cfg.export).spec_defaults.get(kind, {}), **args} if cfg.export else args
    spec = method.make_spec(method.split_options(args)[0], adapter, cfg.calibrated)
    fraction = layer_fraction(cfg.layers, method)
    meta = {}
    if fraction is None:
        chosen = set(parse_layers(cfg.layers, adapter.n_layers))
    else:  # the method picks among the layers its spec can run in, checked before the measurement
        eligible, refusal = [], None
        for i in range(adapter.n_layers):
            try:
                method.check(spec, adapter, i)
                eligible.append(i)
            except KvxError as e:
                refusal = refusal or e
        if not eligible:
            raise refusal
        if tokenizer is None:
            raise KvxError(
                f"choosing layers by {method.layer_score} needs text, and the model has no tokenizer: list the layers"
            )
        scores = LAYER_SCORES[method.layer_score](base, tokenizer, adapter, spec, cfg, progress)
        ranked = top_layers([scores[i] for i in eligible], fraction * adapter.n_layers / len(eligible))
        chosen = {eligible[j] for j in ranked}
        meta[method.layer_score] = [round(x, 4) for x in scores]
    plan = Plan([spec if i in chosen else FullSpec() for i in range(adapter.n_layers)], name, meta)
    layers = "all layers" if len(chosen) == adapter.n_layers else f"layers {','.join(map(str, sorted(chosen)))}"
    return plan, f"--to {spec_string(spec)} on {layers}"


def _plan_from_file(cfg: ConvertConfig, adapter, name) -> Plan:
    plan = Plan.load(cfg.plan) if isinstance(cfg.plan, (str, Path)) else cfg.plan
    if len(plan.layers) != adapter.n_layers:
        raise KvxError(f"the plan has {len(plan.layers)} layers but the model has {adapter.n_layers}")
    return Plan(plan.layers, name, {k: v for k, v in plan.meta.items() if k != "conversion"})


def _probe_len(plan: Plan, cfg: ConvertConfig, config) -> int:
    """Cache size does not depend on content; a layer whose cache stops growing shows it only
    past its cap, so the probe runs to twice the largest cap."""
    huge = 1 << 30
    caps = [s.cached_tokens(huge) for s in plan.layers if s.cached_tokens(huge) < huge]
    n = max([cfg.calib_seq_len] + [2 * c for c in caps])
    return min(n, getattr(config, "max_position_embeddings", n))


def convert(
    model: str,
    out: str | Path,
    cfg: ConvertConfig | None = None,
    *,
    plan: Plan | None = None,
    overwrite: bool = False,
    progress: Progress = no_progress,
    loaded: tuple | None = None,
    **options,
) -> dict:
    """``kvx convert``: MODEL converted per ``cfg`` (or per ``plan``) into a checkpoint at ``out``.

    ``options``: ``ConvertConfig`` fields and method shortcuts as keywords, for library callers
    (``convert(m, out, kv_rank=60, rope_dims=36)``). ``loaded``: ``load_model(model)``'s result
    when the caller already holds it. Returns the plan, KV bytes, per-layer figures, the path.
    """
    cfg = cfg or ConvertConfig.make(**options)
    if plan is not None:
        cfg = dataclasses.replace(cfg, plan=plan)
    cfg.check()
    out = Path(out)
    check_output(out, overwrite)
    base, tokenizer, name = loaded or load_model(model, need_tokenizer=False)
    adapter = get_adapter(base.config)
    if cfg.plan is not None:
        plan, how = _plan_from_file(cfg, adapter, name), "a per-layer plan"
    else:
        plan, how = _plan_from_target(cfg, base, tokenizer, adapter, name, progress)
    for i, spec in enumerate(plan.layers):  # every spec checked once, before any work
        method_of(spec).check(spec, adapter, i)
    exporter, export_out = None, None
    if cfg.export:
        exporter = check_export(cfg.export)
        exporter.check(plan, adapter)
        export_out = out.with_name(f"{out.name}-{cfg.export}")
        check_output(export_out, overwrite)
    options = cfg.conversion_options()
    needs = {i: method_of(s).needs(s, cfg.calibrated, options.get(s.kind)) for i, s in enumerate(plan.layers)}

    calib_layers = sorted(i for i, n in needs.items() if "calibration" in n)
    plan.meta["conversion"] = {
        "calib": cfg.calib if calib_layers else "none",
        "calib_tokens": cfg.calib_tokens if calib_layers else 0,
    }
    if calib_layers:
        plan.meta["conversion"].update(calib_inputs=cfg.calib_inputs, fit_steps=cfg.fit_steps, options=options)
    plan.meta["source"] = str(Path(model).resolve()) if Path(model).exists() else model  # the default teacher
    meta = {"k_norm_eps": adapter.k_norm_eps()}
    records = {}
    if calib_layers:
        if tokenizer is None:
            raise KvxError(
                f"{model} has no tokenizer, which calibration needs: copy the base model's tokenizer files or pass "
                "--calib none"
            )
        windows = token_windows(tokenizer, cfg.calib, "calib", cfg.calib_tokens, cfg.calib_seq_len)
        outputs, records = sequential_convert(
            base,
            plan,
            adapter,
            windows,
            True,
            meta,
            inputs=cfg.calib_inputs,
            fit=FitSettings(cfg.fit_steps, cfg.fit_lr),
            options=options,
            on_layer=progress("converting layer by layer", adapter.n_layers),
        )
        converted = assemble(base, plan, outputs, adapter, meta)
    else:
        converted, outputs = convert_model(base, plan, {}, progress("converting layers", adapter.n_layers), options)

    probe = (torch.arange(_probe_len(plan, cfg, base.config)) % base.config.vocab_size)[None]
    kv = {
        "baseline": kv_bytes_per_token(base, probe),
        "measured": kv_bytes_per_token(converted, probe),
        "spec": kv_bytes_per_token_spec(converted, probe.shape[-1]),
        "tokens": probe.shape[-1],
        "dtype": str(next(converted.parameters()).dtype).removeprefix("torch."),
    }
    extra = {"conversion": f"{how}, calibration: {cfg.calib if calib_layers else 'none (weights only)'}"}
    figures: dict[str, list[float]] = {}
    for o in outputs.values():
        for key, value in o.info.items():
            figures.setdefault(key, []).append(value)
    for key, values in figures.items():
        extra[f"mean {key}"] = f"{sum(values) / len(values):.4f}"
    notes = []
    if tokenizer is None:
        notes.append(
            f"{model} has no tokenizer: none was copied into {out}; add the base model's tokenizer files before "
            "evaluating"
        )
        extra["tokenizer"] = "none (the source folder has none)"
    converted.generation_config = base.generation_config
    save_checkpoint(converted, tokenizer, out, lambda _: model_card(name, plan, kv, extra), overwrite=overwrite)
    result = {"out": str(out), "plan": plan, "kv": kv, "figures": figures, "notes": notes, "layers": records}
    if exporter is not None:
        result[cfg.export] = str(
            run_export(exporter, base, converted, tokenizer, adapter, plan, export_out, str(out), overwrite)
        )
    return result
