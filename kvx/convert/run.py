"""``kvx convert``: a plan from the config (or a plan file), checked once; then the model a layer
at a time (read from its shards, calibrated, converted by its spec's method, fitted, its cache
measured, written to its own shard); then the checkpoint's config, runtime, tokenizer and card,
all in a temporary folder renamed at the end; then the exports."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from ..arch import get_adapter
from ..checkpoint import atomic_dir, check_output, writes_output
from ..errors import KvxError
from ..export import check_export, run_export
from ..generate import sampled_tokens, text_windows
from ..hub import model_card
from ..io import ShardWriter
from ..io.staging import pause_point
from ..layerwise import Walker
from ..loading import load_model, load_source, load_tokenizer, resolve
from ..measure.kv import check_layer_bytes
from ..methods import check_plan, get_method, method_of, prepare_plan
from ..modeling.modeling_kvx import write_checkpoint_files
from ..plan import FullSpec, Plan, parse_layers, spec_string
from ..progress import Progress, no_progress
from .config import ConvertConfig, layer_fraction, top_layers
from .lazy import is_local_checkpoint, skeleton
from .scores import LAYER_SCORES
from .sequential import FitSettings, sequential_convert


def _plan_from_target(cfg: ConvertConfig, scorer, tokenizer, adapter, name, progress) -> tuple[Plan, str]:
    """The plan of ``--to SPEC --layers L``; ``scorer()`` gives the full model when a method must
    measure layers to choose them (``--layers auto``)."""
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
        scores = LAYER_SCORES[method.layer_score](scorer(), tokenizer, adapter, spec, cfg, progress)
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


def _layer_writer(writer: ShardWriter, adapter, plan: Plan, dtype: torch.dtype):
    """``emit`` for the walker: a converted layer = its base tensors outside attention + the method's
    attention tensors, every base attention tensor not carried over declared dropped by the method."""

    def emit(i, out, layer):
        prefix, attn = adapter.layer_prefix(i), adapter.attention_prefix(i)
        inner = attn[len(prefix) :]
        base = layer.state_dict()
        base_attn = {k[len(inner) :] for k in base if k.startswith(inner)}
        silent = sorted(base_attn - set(out.state) - set(out.dropped))
        if silent:
            raise RuntimeError(f"layer {i}: the {plan.layers[i].kind} conversion drops {silent} without saying why")
        tensors = {prefix + k: v for k, v in base.items() if not k.startswith(inner)}
        tensors.update({attn + k: v.to(dtype) if v.is_floating_point() else v for k, v in out.state.items()})
        writer.add(tensors)

    return emit


def _outer_tensors(model, adapter, reader) -> dict:
    """The tensors outside the decoder layers, as the checkpoint stores them (a tied head: not stored)."""
    layers = tuple(adapter.layer_prefix(i) for i in range(adapter.n_layers))
    if reader is not None:
        return reader.read([n for n in reader.names() if not n.startswith(layers)])
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    return {k: v for k, v in model.state_dict().items() if not k.startswith(layers) and k not in tied}


def _model_state(plan: Plan, stores: dict | None, options: dict, progress: Progress) -> tuple[dict, list[str]]:
    """Each kind's model-level tensors (a shared predictor), built from what its layers recorded;
    their figures go into the plan's conversion record, their summaries into the notes."""
    tensors, notes = {}, []
    for kind in dict.fromkeys(s.kind for s in plan.layers):
        method = get_method(kind)
        store = None if stores is None else stores.get(kind, {})
        made, info = method.model_state(plan, store, options.get(kind, {}), progress)
        tensors.update(made)
        plan.meta["conversion"].update(info)
        notes += [f"{key}: {v['summary']}" for key, v in info.items() if isinstance(v, dict) and "summary" in v]
    return tensors, notes


def _expected_bytes(source: str | None, base) -> int:
    """About what the converted checkpoint takes on disk: its base's weights (the latents are smaller
    than the K/V projections they replace; the rest is copied)."""
    if base is not None:
        return sum(p.numel() * p.element_size() for p in base.parameters() if not p.is_meta)
    folder = Path(source)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def _calibration_windows(cfg: ConvertConfig, model: str, loaded: tuple | None, tokenizer, progress: Progress):
    """The calibration text's windows; ``teacher``: text the source model writes (loaded for that
    alone and freed, unless the caller holds it; cached, so a second conversion samples nothing)."""
    writer = loaded[0] if loaded is not None else (lambda: load_model(model)[0])
    sampled = sampled_tokens(cfg.calib, cfg.calib_tokens)
    on_window = progress("the model writes its calibration text", sampled) if sampled else None
    return text_windows(
        writer, tokenizer, cfg.calib, cfg.calib_tokens, cfg.calib_seq_len, 0, resolve(model)[0], on_window
    )


@writes_output
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

    A local safetensors checkpoint is converted without ever holding the whole model (its layers
    are read one at a time); anything else is loaded first. ``options``: ``ConvertConfig`` fields
    and method shortcuts as keywords, for library callers (``convert(m, out, kv_rank=60,
    rope_dims=36)``). ``loaded``: ``load_model(model)``'s result when the caller holds it.
    Returns the plan, KV bytes, per-layer figures and records, the path.
    """
    cfg = cfg or ConvertConfig.make(**options)
    if plan is not None:
        cfg = dataclasses.replace(cfg, plan=plan)
    cfg.check()
    out = Path(out)
    check_output(out, overwrite)
    if loaded is not None:
        base, tokenizer, name = loaded
        source, config, reader = None, base.config, None
    else:
        source, name, config = load_source(model)
        tokenizer, base, reader = load_tokenizer(source), None, None
    check_output(out, overwrite, _expected_bytes(source, base))  # free space: refused before any work
    if getattr(config, "kvx", None):  # its layers are no longer the family's: nothing to read them as
        raise KvxError(
            f"{model} is already a kvx checkpoint ({Plan.from_config(config).summary()}): convert its source "
            "model instead; a --plan gives each layer its own kind (mla in some layers, evict in others)"
        )
    adapter = get_adapter(config)
    if cfg.plan is not None:
        plan, how = _plan_from_file(cfg, adapter, name), "a per-layer plan"
    else:
        plan, how = _plan_from_target(cfg, lambda: base or load_model(model)[0], tokenizer, adapter, name, progress)
    check_plan(plan, adapter)  # every spec checked once, before any work
    exporter, export_out = None, None
    if cfg.export:
        exporter = check_export(cfg.export)
        exporter.check(plan, adapter)
        export_out = out.with_name(f"{out.name}-{cfg.export}")
        check_output(export_out, overwrite)
    options = cfg.conversion_options()
    prepare_plan(plan, adapter, options, tokenizer)
    needs = {i: method_of(s).needs(s, cfg.calibrated, options.get(s.kind)) for i, s in enumerate(plan.layers)}
    calibrated = any("calibration" in n for n in needs.values())
    if calibrated and tokenizer is None:
        raise KvxError(
            f"{model} has no tokenizer, which calibration needs: copy the base model's tokenizer files "
            "or pass --calib none"
        )

    if base is None and is_local_checkpoint(source):
        base, reader = skeleton(source, config, adapter)
    elif base is None:
        base = load_model(model, need_tokenizer=False)[0]
    if calibrated:
        windows = _calibration_windows(cfg, model, loaded, tokenizer, progress)
    else:  # no statistics: one batch to run each layer through, for its cache measurement
        windows = (torch.arange(_probe_len(plan, cfg, config)) % config.vocab_size)[None]
    batches = [windows[i : i + 4] for i in range(0, windows.shape[0], 4)]
    plan.meta["conversion"] = {
        "calib": cfg.calib if calibrated else "none",
        "calib_tokens": cfg.calib_tokens if calibrated else 0,
    }
    if calibrated:
        plan.meta["conversion"].update(
            calib_inputs=cfg.calib_inputs,
            fit_steps=cfg.fit_steps,
            fit_also=list(cfg.fit_modules_also()),
            options=options,
        )
    plan.meta["source"] = str(Path(model).resolve()) if Path(model).exists() else model  # the default teacher
    meta = {"k_norm_eps": adapter.k_norm_eps()}
    dtype = next(p for p in base.parameters() if not p.is_meta).dtype

    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp)
        figures: dict[str, list[float]] = {}

        def emit(i, output, layer):
            for key, value in output.info.items():
                figures.setdefault(key, []).append(value)
            write(i, output, layer)
            pause_point("convert-layer")

        write = _layer_writer(writer, adapter, plan, dtype)
        stores: dict[str, dict] = {}
        walker = Walker(base, adapter, batches, reader)
        records = sequential_convert(
            walker,
            plan,
            calibrated,
            meta,
            emit,
            inputs=cfg.calib_inputs,
            fit=FitSettings(cfg.fit_steps, cfg.fit_lr, cfg.fit_modules_also()),
            options=options,
            on_layer=progress("converting layer by layer", adapter.n_layers),
            store=stores,
        )
        writer.add(_outer_tensors(base, adapter, reader))
        model_tensors, notes = _model_state(plan, stores if calibrated else None, options, progress)
        writer.add(model_tensors)
        writer.finish()

        n_tokens, batch = batches[0].shape[1], batches[0].shape[0]
        # measured in float32; a reference model's cache (run beside the model) after the decoder's layers
        spec_bytes = plan.layer_kv_bytes(adapter.geometry(), n_tokens, 4) + plan.reference_kv_bytes(n_tokens, 4)
        got = [r.cache_bytes for r in records.values()]
        for kind in plan.kinds():
            got += get_method(kind).attached_cache_bytes(plan, model_tensors, batches[0])
        measured = check_layer_bytes(plan, got, spec_bytes, n_tokens, batch)
        kv = {
            "baseline": sum(r.base_cache_bytes for r in records.values()) / (batch * n_tokens),
            "measured": measured / (batch * n_tokens),
            "spec": sum(spec_bytes) / n_tokens,
            "tokens": n_tokens,
            "dtype": "float32",
        }
        converted_config = copy.deepcopy(config)
        converted_config.kvx = {**plan.to_dict(), **meta}
        converted_config.dtype = dtype
        converted_config.save_pretrained(tmp)
        write_checkpoint_files(tmp)
        _generation_config(base, source).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extra = {"conversion": f"{how}, calibration: {cfg.calib if calibrated else 'none (weights only)'}"}
        for key, values in figures.items():
            extra[f"mean {key}"] = f"{sum(values) / len(values):.4f}"
        if tokenizer is None:
            notes.append(
                f"{model} has no tokenizer: none was copied into {out}; add the base model's tokenizer files before "
                "evaluating"
            )
            extra["tokenizer"] = "none (the source folder has none)"
        (tmp / "README.md").write_text(model_card(name, plan, kv, extra))
    result = {"out": str(out), "plan": plan, "kv": kv, "figures": figures, "notes": notes, "layers": records}
    if exporter is not None:
        base_source = source if source is not None else model
        result[cfg.export] = str(
            run_export(exporter, base_source, out, tokenizer, adapter, plan, export_out, overwrite)
        )
    return result


def _generation_config(base, source):
    from transformers import GenerationConfig

    if source is not None and (Path(source) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return getattr(base, "generation_config", None) or GenerationConfig()
