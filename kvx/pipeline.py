"""Library entry points behind the CLI: each command is one function here."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .arch import get_adapter
from .calibration import collect_stats
from .checkpoint import atomic_dir, check_output, save_checkpoint
from .convert.mla import (
    LAYOUTS,
    ROPE_SELECTIONS,
    SHARED_ROPE_SELECTIONS,
    convert_layer_to_mla,
    convert_layer_to_shared_mla,
    full_rank,
    validate_mla_dims,
    validate_rope_dims,
)
from .data import token_windows
from .errors import KvxError
from .eval import compare, evaluate_model, kv_bytes_per_token, kv_bytes_per_token_spec, long_context, perplexity
from .export import check_deepseek_plan, export_deepseek, export_native, native_layer_types
from .hub import model_card
from .loading import build_uninitialised, load_model
from .modeling.modeling_kvx import MLAAttention, kvx_class_for
from .plan import FullSpec, MLASpec, Plan, StreamingSpec

# progress(description, total) -> advance(n, info=None); the CLI draws bars, library callers may pass nothing.
Progress = Callable[[str, int], Callable[..., None]]


def _no_progress(description: str, total: int) -> Callable[..., None]:
    return lambda n, info=None: None


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


def _resolve_dims(kv_rank: str | int, rope_dims: str | int, adapter, hidden: int, layout: str = "kvx") -> tuple[int, int]:
    n_kv, hd = adapter.n_kv_heads, adapter.head_dim
    try:
        every = n_kv * hd if layout == "kvx" else hd
        r_dims = every if str(rope_dims) == "all" else int(rope_dims)
    except ValueError:
        raise KvxError(f"--rope-dims must be an integer or 'all', not {rope_dims!r}") from None
    validate_rope_dims(r_dims, n_kv, hd, layout)
    try:
        rank = full_rank(n_kv, hd, r_dims, hidden, layout) if str(kv_rank) == "full" else int(kv_rank)
    except ValueError:
        raise KvxError(f"--kv-rank must be an integer or 'full', not {kv_rank!r}") from None
    validate_mla_dims(rank, r_dims, n_kv, hd, hidden, layout)
    return rank, r_dims


def build_converted(base_model, plan: Plan, layer_weights: dict, k_norm_eps: float | None):
    """A kvx model for ``plan``: base weights everywhere, ``layer_weights`` in the MLA layers."""
    config = copy.deepcopy(base_model.config)
    config.kvx = {**plan.to_dict(), "k_norm_eps": k_norm_eps}
    model = build_uninitialised(kvx_class_for(config), config)
    model.to(next(base_model.parameters()).dtype)
    result = model.load_state_dict(base_model.state_dict(), strict=False)
    model.tie_weights()
    adapter = get_adapter(config)
    for idx, w in layer_weights.items():
        attn = adapter.attention(model, idx)
        with torch.no_grad():
            attn.kv_a_proj.weight.copy_(w.kv_a)
            attn.kv_b_proj.weight.copy_(w.kv_b)
            if attn.kv_b_proj.bias is not None:
                attn.kv_b_proj.bias.copy_(w.kv_b_bias)
            if attn.k_rope_proj is not None:
                attn.k_rope_proj.weight.copy_(w.k_rope)
                if attn.k_rope_proj.bias is not None:
                    attn.k_rope_proj.bias.copy_(w.k_rope_bias)
            attn.rope_pairs.copy_(w.rope_pairs)
            if w.rope_mix is not None:
                attn.rope_mix.copy_(w.rope_mix)
            if w.latent_scale is not None:
                attn.kv_a_layernorm.weight.fill_(w.latent_scale)
            if attn.k_scale_proj is not None:
                base_attn = adapter.attention(base_model, idx)
                attn.k_scale_proj.load_state_dict(base_attn.k_proj.state_dict())
    # Every weight the base checkpoint lacks must be one of the MLA layers' new ones, filled above.
    mla_prefixes = tuple(
        f"{name}.{part}"
        for name, mod in model.named_modules()
        if isinstance(mod, MLAAttention) and mod.layer_idx in layer_weights
        for part in ("kv_a_proj.", "kv_b_proj.", "k_rope_proj.", "k_scale_proj.", "kv_a_layernorm.", "rope_pairs", "rope_mix")
    )
    unset = [k for k in result.missing_keys if not k.startswith(mla_prefixes)]
    if unset:
        raise RuntimeError(f"converted model left weights unset: {unset[:5]}")
    model.eval()
    return model


def _plan_from_args(adapter, hidden, kv_rank, rope_dims, rope_select, layers, name, layout="kvx") -> Plan:
    rank, r_dims = _resolve_dims(kv_rank, rope_dims, adapter, hidden, layout)
    chosen = set(parse_layers(layers, adapter.n_layers))
    spec = MLASpec(rank, r_dims, rope_select, layout)
    return Plan([spec if i in chosen else FullSpec() for i in range(adapter.n_layers)], name)


def _check_layout(layout: str, rope_select: str, adapter) -> None:
    """A shared RoPE key (shared, deepseek layouts) is DeepSeek-V3's attention: no per-head key norms,
    only frequencies its RoPE can make."""
    if layout not in LAYOUTS:
        raise KvxError(f"unknown MLA layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if layout == "kvx":
        return
    if adapter.has_qk_norm:
        raise KvxError(
            f"{adapter.family} RMS-normalises keys per head, which a shared RoPE key cannot express: use --layout kvx"
        )
    if rope_select not in SHARED_ROPE_SELECTIONS:
        raise KvxError(
            f"--rope-select {rope_select!r} cannot feed one shared RoPE key (--layout {layout}): "
            f"choose {' or '.join(SHARED_ROPE_SELECTIONS)}"
        )


def _check_plan(plan: Plan, adapter, hidden: int) -> None:
    """A plan from a file must fit this model and use only specs convert can build today."""
    if len(plan.layers) != adapter.n_layers:
        raise KvxError(f"the plan has {len(plan.layers)} layers but the model has {adapter.n_layers}")
    for i, spec in enumerate(plan.layers):
        if isinstance(spec, StreamingSpec):
            if spec.sink < 0 or spec.window < 1:
                raise KvxError(f"layer {i}: streaming needs sink >= 0 and window >= 1 (got {spec.sink}, {spec.window})")
            if adapter.sliding_window(i) is not None:
                raise KvxError(f"layer {i} already attends to a local window of {adapter.sliding_window(i)}: it cannot be streaming")
        if isinstance(spec, MLASpec):
            if spec.rope_select not in ROPE_SELECTIONS:
                raise KvxError(f"layer {i}: unknown rope_select {spec.rope_select!r}")
            _check_layout(spec.layout, spec.rope_select, adapter)
            validate_mla_dims(spec.kv_rank, spec.rope_dims, adapter.n_kv_heads, adapter.head_dim, hidden, spec.layout)


def convert_to_mla(
    model: str,
    out: str | Path,
    kv_rank: str | int = "full",
    rope_dims: str | int = "all",
    rope_select: str | None = None,
    calib: str = "bundled",
    calib_tokens: int = 16384,
    calib_seq_len: int = 512,
    layers: str | None = None,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    plan: str | Path | Plan | None = None,
    export: str | None = None,
    loaded: tuple | None = None,
    layout: str = "kvx",
) -> dict:
    """``kvx convert MODEL --to mla`` (uniform), or any per-layer ``plan`` (mla/streaming/full).

    ``layout``: ``kvx``, ``shared`` or ``deepseek`` (see ``MLASpec``); ``export="deepseek"`` implies the last.
    ``loaded``: ``load_model(model)``'s result when the caller already holds it.
    Returns a summary: the plan, KV bytes, kept energy per converted layer, the output path.
    """
    out = Path(out)
    check_output(out, overwrite)
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    use_calib = calib.lower() != "none"
    base, tokenizer, name = loaded or load_model(model, need_tokenizer=use_calib)
    adapter = get_adapter(base.config)
    hidden = base.config.hidden_size
    if plan is None:
        layout = "deepseek" if export == "deepseek" else layout
        rope_select = rope_select or ("high" if layout != "kvx" or not use_calib else "2norm")
        if rope_select not in ROPE_SELECTIONS:
            raise KvxError(f"unknown --rope-select {rope_select!r} (choose from {', '.join(ROPE_SELECTIONS)})")
        _check_layout(layout, rope_select, adapter)
        plan = _plan_from_args(adapter, hidden, kv_rank, rope_dims, rope_select, layers, name, layout)
        how = f"--kv-rank {kv_rank} --rope-dims {rope_dims} --rope-select {rope_select} --layout {layout}"
    else:
        _check_plan(plan, adapter, hidden)
        plan = Plan(plan.layers, name, {k: v for k, v in plan.meta.items() if k != "conversion"})
        how = "a per-layer plan"
    export_out = _check_export(export, plan, adapter, out, overwrite)
    mla = {i: s for i, s in enumerate(plan.layers) if isinstance(s, MLASpec)}
    if not use_calib and any(s.rope_select == "2norm" for s in mla.values()):
        raise KvxError("--rope-select 2norm needs calibration data: drop --calib none or pick high/low/uniform")

    stats = {}
    if use_calib and mla:
        windows = token_windows(tokenizer, calib, "calib", calib_tokens, calib_seq_len)
        advance = progress("calibrating", windows.numel())
        stats = collect_stats(base, adapter, windows, sorted(mla), on_batch=advance)

    advance = progress("converting layers", len(mla))
    weights = {}
    for idx, spec in mla.items():
        attn = adapter.attention(base, idx)
        w = adapter.attention_weights(attn)
        dims = dict(n_kv=adapter.n_kv_heads, head_dim=adapter.head_dim, kv_rank=spec.kv_rank, rope_dims=spec.rope_dims)
        if spec.layout != "kvx":
            weights[idx] = convert_layer_to_shared_mla(
                w.wk, w.wv, w.bk, w.bv, **dims, rope_select=spec.rope_select, stats=stats.get(idx),
                latent_norm=spec.layout == "deepseek",
            )
        else:
            weights[idx] = convert_layer_to_mla(
                w.wk, w.wv, w.bk, w.bv, **dims, rope_select=spec.rope_select, stats=stats.get(idx),
                k_gain=adapter.k_norm_weight(attn),
            )
        advance(1)
    energies = [w.energy_kept for w in weights.values()]

    plan.meta["conversion"] = {"calib": calib if use_calib else "none", "calib_tokens": calib_tokens if use_calib else 0}
    plan.meta["source"] = str(Path(model).resolve()) if Path(model).exists() else model  # the default teacher
    converted = build_converted(base, plan, weights, adapter.k_norm_eps())

    # Cache size does not depend on content; streaming layers show their cap only past sink + window.
    probe_len = max([calib_seq_len] + [2 * (s.sink + s.window) for s in plan.layers if isinstance(s, StreamingSpec)])
    probe_len = min(probe_len, getattr(base.config, "max_position_embeddings", probe_len))
    probe = (torch.arange(probe_len) % base.config.vocab_size)[None]
    kv = {
        "baseline": kv_bytes_per_token(base, probe),
        "measured": kv_bytes_per_token(converted, probe),
        "spec": kv_bytes_per_token_spec(converted, probe.shape[-1]),
        "tokens": probe.shape[-1],
        "dtype": "float32",
    }
    extra = {"conversion": f"{how}, calibration: {calib if use_calib else 'none (weights-only SVD)'}"}
    notes = []
    if tokenizer is None:
        notes.append(f"{model} has no tokenizer: none was copied into {out}; add the base model's tokenizer files before evaluating")
        extra["tokenizer"] = "none (the source folder has none)"
    if energies:
        extra["mean share of [K_nope; V] energy kept by the latent"] = f"{sum(energies) / len(energies):.4f}"
    shared = [w.rope_energy_kept for w in weights.values() if w.rope_energy_kept is not None]
    if shared:
        extra["mean share of kept-frequency key energy in the shared RoPE key"] = f"{sum(shared) / len(shared):.4f}"
    converted.generation_config = base.generation_config
    save_checkpoint(converted, tokenizer, out, lambda _: model_card(name, plan, kv, extra), overwrite=overwrite)
    result = {"out": str(out), "plan": plan, "kv": kv, "energy_kept": energies, "notes": notes}
    if export_out is not None and export == "native":
        result["native"] = str(export_native(base, tokenizer, adapter, plan, export_out, overwrite))
    elif export_out is not None:
        result["deepseek"] = str(export_deepseek(converted, tokenizer, export_out, str(out), overwrite))
    return result


def _check_export(export: str | None, plan: Plan, adapter, out: Path, overwrite: bool) -> Path | None:
    """Validate ``--export`` before any work; returns where the export goes."""
    if export is None:
        return None
    if export == "deepseek":
        check_deepseek_plan(plan, adapter)
    elif export == "native":
        native_layer_types(plan)
        adapter.native_sliding_config(["full_attention"] * adapter.n_layers, 2)
    else:
        raise KvxError(f"--export {export!r} is not available (available: native, deepseek)")
    target = out.with_name(f"{out.name}-{export}")
    check_output(target, overwrite)
    return target


def lazy_layers(
    model,
    tokenizer,
    adapter,
    data: str,
    sink: int,
    window: int,
    tokens: int = 8192,
    seq_len: int | None = None,
    progress: Progress = _no_progress,
) -> list[float]:
    """Each layer's lazy ratio on DATA's calibration part, in windows of ``seq_len`` tokens
    (default ``2 x (sink + window + 1)``, within the model's positions). On SmolLM2 the
    ranking at 8192 tokens was nearly the same as at 2050, at six times the cost."""
    from .profile.collect import ProfileSettings, run_profile

    seq_len = min(seq_len or 2 * (sink + window + 1), getattr(model.config, "max_position_embeddings", 1 << 30))
    if seq_len <= sink + window:
        raise KvxError(f"sink {sink} + window {window} leaves no room inside the model's {seq_len} positions")
    windows = token_windows(tokenizer, data, "calib", max(tokens, seq_len), seq_len)
    settings = ProfileSettings(sink=sink, window=window, topk=1)
    col = run_profile(model, adapter, windows, settings, on_batch=progress("measuring lazy layers", windows.numel()))
    return [float(col.layers[i].lazy_per_head.mean()) for i in range(adapter.n_layers)]


def streaming_fraction(spec: str) -> float | None:
    """``auto`` -> 0.5 (LightTransfer's half), ``0.25`` -> 0.25, a layer list -> None."""
    if spec == "auto":
        return 0.5
    if re.fullmatch(r"0?\.\d+", spec):
        if float(spec) <= 0:
            raise KvxError(f"--layers {spec}: a fraction must be above 0")
        return float(spec)
    return None


def choose_streaming_layers(spec: str, lazy: list[float] | None, n_layers: int) -> list[int]:
    """``auto`` (half), a fraction like ``0.25`` (laziest first) or an explicit layer list."""
    fraction = streaming_fraction(spec)
    if fraction is None:
        return parse_layers(spec, n_layers)
    ranked = sorted(range(n_layers), key=lambda i: -lazy[i])
    return sorted(ranked[: max(1, round(fraction * n_layers))])


def convert_to_streaming(
    model: str,
    out: str | Path,
    layers: str = "auto",
    sink: int = 4,
    window: int = 1020,
    data: str = "bundled",
    overwrite: bool = False,
    progress: Progress = _no_progress,
    export: str | None = None,
) -> dict:
    """``kvx convert MODEL --to streaming``: the laziest layers (or the listed ones) keep sinks + a window."""
    check_output(Path(out), overwrite)
    if sink < 0 or window < 1:
        raise KvxError(f"--sink must be >= 0 and --window >= 1 (got {sink}, {window})")
    needs_profile = streaming_fraction(layers) is not None
    base, tokenizer, name = load_model(model, need_tokenizer=needs_profile)
    adapter = get_adapter(base.config)
    lazy = lazy_layers(base, tokenizer, adapter, data, sink, window, progress=progress) if needs_profile else None
    chosen = set(choose_streaming_layers(layers, lazy, adapter.n_layers))
    plan = Plan([StreamingSpec(sink, window) if i in chosen else FullSpec() for i in range(adapter.n_layers)], name)
    if lazy is not None:
        plan.meta["lazy_ratio"] = [round(x, 4) for x in lazy]
    return convert_to_mla(
        model, out, plan=plan, calib="none", overwrite=overwrite, progress=progress, export=export,
        loaded=(base, tokenizer, name),
    )


def evaluate(
    model: str,
    baseline: str | None = None,
    data: str = "bundled",
    max_tokens: int = 8192,
    seq_len: int = 512,
    long: list[int] | None = None,
    long_tail: int = 1024,
    long_docs: int = 4,
    progress: Progress = _no_progress,
) -> dict:
    """``kvx eval``: the JSON object with model/baseline rows and kv_ratio/ppl_ratio
    (plus, for each ``long`` context, tail perplexity and cache bytes of long documents)."""
    for ctx in long or []:
        if not 0 < long_tail < ctx:
            raise KvxError(f"--long-tail {long_tail} must be below every --long context ({ctx})")
    rows = []
    for ref in (model, baseline):
        if ref is None:
            rows.append(None)
            continue
        m, tok, _ = load_model(ref)
        advance = progress(f"evaluating {ref}", max_tokens // seq_len * seq_len)
        row = evaluate_model(m, tok, data, max_tokens, seq_len, on_batch=advance)
        row["name"] = ref
        if long:
            limit = getattr(m.config, "max_position_embeddings", None)
            if limit and max(long) > limit:
                raise KvxError(f"--long {max(long)} exceeds {ref}'s {limit} positions")
            row["long"] = {
                str(ctx): long_context(m, tok, data, ctx, long_tail, long_docs, on_doc=progress(f"{ref} at {ctx} tokens", long_docs))
                for ctx in long
            }
        rows.append(row)
        del m
    return compare(rows[0], rows[1])


def profile(
    model: str,
    out: str | Path,
    data: str = "bundled",
    tokens: int = 8192,
    seq_len: int = 1024,
    reference: str | None = None,
    sink: int = 4,
    window: int | None = None,
    topk: int = 16,
    rope_dims: int | None = None,
    target_kv_ratio: float = 4.0,
    streaming: bool = False,
    lazy_threshold: float = 0.9,
    xscale_tokens: int = 256,
    overwrite: bool = False,
    progress: Progress = _no_progress,
) -> dict:
    """``kvx profile``: measure every layer on DATA's calibration part and suggest a plan.

    Writes report.json, PNG plots and plan.yaml to ``out``; returns the report.
    """
    from .convert.mla import joint_kv, output_spectrum, select_pairs
    from .profile.collect import ProfileSettings, attention_maps, cross_scale_similarity, run_profile
    from .profile.metrics import energy_ranks
    from .profile.report import write_report
    from .profile.suggest import check_room, default_rope_dims, suggest_plan

    check_output(Path(out), overwrite)
    window = max(1, seq_len // 8) if window is None else window
    if sink < 0 or window < 1 or sink + window >= seq_len:
        raise KvxError(f"--sink {sink} + --window {window} must be below --seq-len {seq_len}")
    if not 1 <= topk < seq_len:
        raise KvxError(f"--topk {topk} must be between 1 and --seq-len - 1")
    base, tokenizer, name = load_model(model)
    if getattr(base.config, "kvx", None):
        raise KvxError(f"{model} is already converted by kvx: profile its base model ({Plan.from_config(base.config).base_model})")
    adapter = get_adapter(base.config)
    geom = adapter.geometry()
    hidden, n_kv, hd = base.config.hidden_size, adapter.n_kv_heads, adapter.head_dim
    r_dims = default_rope_dims(geom, target_kv_ratio) if rope_dims is None else rope_dims
    validate_rope_dims(r_dims, n_kv, hd)
    if not streaming:
        check_room(geom, adapter.n_layers, target_kv_ratio, r_dims)
    ref = None
    if reference is not None:
        ref, ref_tok, ref_name = load_model(reference)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise KvxError(f"--reference {reference} has another tokenizer than {model}: attention maps would not align")
        get_adapter(ref.config)

    windows = token_windows(tokenizer, data, "calib", tokens, seq_len)
    settings = ProfileSettings(sink=sink, window=window, topk=topk)
    col = run_profile(base, adapter, windows, settings, on_batch=progress("profiling", windows.numel()))

    layers, spectra, lazy = [], [], []
    m = r_dims // (2 * n_kv)
    for i in range(adapter.n_layers):
        attn, st, lp = adapter.attention(base, i), col.stats[i], col.layers[i]
        w = adapter.attention_weights(attn)
        cov = st.covariance
        pairs = select_pairs("2norm", n_kv, hd, m, st.pair_score)
        jkv = joint_kv(w.wk, w.wv, w.bk, n_kv=n_kv, head_dim=hd, pairs=pairs, cov=cov, k_gain=adapter.k_norm_weight(attn))
        joint_ev = output_spectrum(jkv.joint, cov)[0][: full_rank(n_kv, hd, r_dims, hidden)]
        spectra.append(joint_ev)
        lazy.append(float(lp.lazy_per_head.mean()))
        layers.append(
            {
                "layer": i,
                "type": (geom.layer_types[i] if geom.layer_types else "full_attention"),
                "lazy_ratio": lazy[-1],
                "lazy_ratio_per_head": lp.lazy_per_head.tolist(),
                "topk_recall": float(lp.recall_per_head.mean()),
                "topk_recall_per_head": lp.recall_per_head.tolist(),
                "spectrum": {
                    "k": energy_ranks(output_spectrum(w.wk, cov)[0][: min(n_kv * hd, hidden)]),
                    "v": energy_ranks(output_spectrum(w.wv, cov)[0][: min(n_kv * hd, hidden)]),
                    "joint": energy_ranks(joint_ev),
                },
                "rope_pair_score": (st.pair_score / st.n_tokens).tolist(),
                "rope_pairs_kept": pairs.tolist(),
            }
        )
    ranking = sorted(range(len(lazy)), key=lambda i: -lazy[i])
    for pos, i in enumerate(ranking):
        layers[i]["lazy_rank"] = pos + 1

    report = {
        "model": name,
        "data": data,
        "tokens": int(windows.numel()),
        "settings": {"seq_len": seq_len, "sink": sink, "window": window, "topk": topk, "rope_dims": r_dims},
        "attention": "recomputed from each layer's own q/k (RoPE, norms, local windows), in float32 query chunks",
        "layers": layers,
        "lazy_ranking": ranking,
        "cross_layer_similarity": {k: (v / col.kv_sim_n).tolist() for k, v in col.kv_sim.items()},
    }
    if ref is not None:
        probe = windows[:2, :xscale_tokens]
        sims = cross_scale_similarity(attention_maps(base, adapter, probe), attention_maps(ref, get_adapter(ref.config), probe))
        best = sims["head_averaged"].max(dim=1)
        report["cross_scale"] = {
            "reference": ref_name,
            "tokens": int(probe.numel()),
            "head_averaged": sims["head_averaged"].tolist(),
            "best_head": sims["best_head"].tolist(),
            "best_mapping": [
                {"layer": i, "reference_layer": int(j), "similarity": float(v)}
                for i, (v, j) in enumerate(zip(best.values, best.indices))
            ],
        }
    plan = suggest_plan(
        geom, spectra, lazy, target_kv_ratio, r_dims, streaming, lazy_threshold, sink=sink, window=window, context=seq_len, base_model=name
    )
    report["suggested_plan"] = plan.to_dict()
    report["expected_kv_ratio"] = plan.meta["expected_kv_ratio"]
    with atomic_dir(out, overwrite) as tmp:
        files = write_report(report, plan, tmp)
    report["files"] = [str(Path(out) / f.name) for f in files]
    return report


def _move_into(src: Path, dst: Path) -> None:
    """Move a finished checkpoint's files into ``dst`` (which holds logs), config.json last:
    until it lands, ``dst`` is not a loadable model, so it is never a half-written one."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        target = dst / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(src / name, target)
    shutil.rmtree(src, ignore_errors=True)


def distill(
    student: str,
    out: str | Path,
    teacher: str | None = None,
    data: str = "bundled",
    tokens: int = 262_144,
    seq_len: int = 256,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 1e-4,
    temperature: float = 1.0,
    loss: str = "kl",
    train: str = "converted",
    eval_every: int = 0,
    save_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    eval_tokens: int = 4096,
    mixed_precision: str = "no",
    lora_rank: int = 8,
    progress: Progress = _no_progress,
) -> dict:
    """``kvx distill``: train STUDENT towards TEACHER (default: the model it was converted from)."""
    from .distill import DistillConfig, run_distill, training_windows

    cfg = DistillConfig(
        tokens=tokens, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, temperature=temperature,
        loss=loss, train=train, eval_every=eval_every, save_every=save_every, seed=seed, mixed_precision=mixed_precision,
        lora_rank=lora_rank,
    )
    cfg.check()
    out = Path(out)
    if resume and not out.exists():
        raise KvxError(f"--resume: {out} does not exist")
    if out.exists() and not resume:
        if not overwrite:
            raise KvxError(f"output {out} already exists (pass --resume to continue it or --overwrite to start over)")
        shutil.rmtree(out)
    s_model, tok, s_name = load_model(student)
    plan = Plan.from_config(s_model.config)
    teacher = teacher or plan.meta.get("source")
    if teacher is None:
        raise KvxError(f"{student} records no source model: pass --teacher")
    t_model, t_tok, t_name = load_model(teacher)
    if t_tok.get_vocab() != tok.get_vocab():
        raise KvxError(f"teacher {teacher} has another vocabulary than the student: logits cannot be compared")
    windows = training_windows(t_model, tok, data, tokens, seq_len, seed, progress("teacher writes text", tokens) if data == "teacher" else None)
    eval_windows = token_windows(tok, "bundled" if data == "teacher" else data, "eval", eval_tokens, seq_len)
    ppl_before = perplexity(s_model, eval_windows)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res = run_distill(
        s_model, t_model, windows, eval_windows, cfg, out, resume, progress, get_adapter(s_model.config).lora_targets()
    )
    accelerator, trained = res["accelerator"], res["student"]
    summary = {"steps": res["steps"], "ppl_before": ppl_before, "seconds": time.perf_counter() - started}
    if accelerator.is_main_process:
        summary["ppl_after"] = perplexity(trained, eval_windows.to(accelerator.device))
        summary["ppl_teacher"] = perplexity(t_model, eval_windows.to(accelerator.device))
        probe = eval_windows[:1].to(accelerator.device)
        kv = {
            "baseline": kv_bytes_per_token(t_model, probe),
            "measured": kv_bytes_per_token(trained, probe),
            "spec": kv_bytes_per_token_spec(trained, probe.shape[-1]),
            "tokens": probe.shape[-1],
            "dtype": str(next(trained.parameters()).dtype).replace("torch.", ""),
        }
        trained_tokens = res["steps"] * batch_size * grad_accum * seq_len * accelerator.num_processes
        plan.meta["distillation"] = {"teacher": teacher, "data": data, "tokens": trained_tokens, "loss": loss, "train": train}
        if getattr(trained.config, "kvx", None):
            trained.config.kvx = {**trained.config.kvx, "distillation": plan.meta["distillation"]}
        extra = {
            "distillation": f"{trained_tokens} tokens of {data} from {teacher}, loss {loss}, trained {train}, {summary['seconds']:.0f} s",
            "perplexity (bundled/eval windows)": f"{ppl_before:.3f} before, {summary['ppl_after']:.3f} after, teacher {summary['ppl_teacher']:.3f}",
        }
        final = out.parent / f".{out.name}.final-tmp"
        if final.exists():
            shutil.rmtree(final)
        save_checkpoint(trained, tok, final, lambda _: model_card(plan.base_model or s_name, plan, kv, extra))
        _move_into(final, out)
        (out / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
