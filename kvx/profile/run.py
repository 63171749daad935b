"""``kvx profile``: measure every layer on calibration text and suggest a plan."""

from __future__ import annotations

from pathlib import Path

from ..arch import get_adapter
from ..checkpoint import atomic_dir, check_output
from ..errors import KvxError
from ..generate import text_windows
from ..io.staging import note
from ..loading import load_model, resolve
from ..measure.attention import ProfileSettings, attention_maps, cross_scale_similarity, run_profile
from ..measure.metrics import energy_ranks
from ..methods.mla.maths import full_rank, joint_kv, output_spectrum, select_pairs, validate_rope_dims
from ..modeling.kvx_mapped import REFERENCE_KEY
from ..plan import Plan
from ..progress import Progress, no_progress
from .config import ProfileConfig
from .report import write_report
from .sensitivity import rank_grid, rope_grid, sweep
from .suggest import check_room, default_rope_dims, suggest_condensed, suggest_mapped, suggest_plan

ALLOCATIONS = ("spectrum", "output", "loss")


def profile(
    model: str,
    out: str | Path,
    cfg: ProfileConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Progress = no_progress,
    **options,
) -> dict:
    """``kvx profile``: measure every layer on DATA's calibration part and suggest a plan.

    Writes report.json, PNG plots and plan.yaml to ``out``; returns the report.
    """
    cfg = cfg or ProfileConfig(**options)
    data, tokens, seq_len, reference, sink, window = (
        cfg.data,
        cfg.tokens,
        cfg.seq_len,
        cfg.reference,
        cfg.sink,
        cfg.window,
    )
    topk, rope_dims, target_kv_ratio, streaming = cfg.topk, cfg.rope_dims, cfg.target_kv_ratio, cfg.streaming
    check_output(Path(out), overwrite)
    window = max(1, seq_len // 8) if window is None else window
    if sink < 0 or window < 1 or sink + window >= seq_len:
        raise KvxError(f"--sink {sink} + --window {window} must be below --seq-len {seq_len}")
    if cfg.allocate not in ALLOCATIONS:
        raise KvxError(f"unknown --allocate {cfg.allocate!r} (choose from {', '.join(ALLOCATIONS)})")
    if not 1 <= topk < seq_len:
        raise KvxError(f"--topk {topk} must be between 1 and --seq-len - 1")
    base, tokenizer, name = load_model(model)
    if getattr(base.config, "kvx", None):
        raise KvxError(
            f"{model} is already converted by kvx: profile its base model ({Plan.from_config(base.config).base_model})"
        )
    adapter = get_adapter(base.config)
    geom = adapter.geometry()
    hidden, n_kv, hd = base.config.hidden_size, adapter.n_kv_heads, adapter.head_dim
    r_dims = default_rope_dims(geom, target_kv_ratio) if rope_dims is None else rope_dims
    validate_rope_dims(r_dims, n_kv, hd)
    if cfg.condensed and (streaming or cfg.allocate != "spectrum"):
        raise KvxError("--condensed plans have no MLA or streaming layers: drop --streaming / --allocate")
    if cfg.mapped and (reference is None or streaming or cfg.condensed or cfg.allocate != "spectrum"):
        raise KvxError("--mapped suggests mapped layers only, onto a --reference: drop --streaming / --condensed")
    if not streaming and not cfg.condensed and not cfg.mapped:
        check_room(geom, adapter.n_layers, target_kv_ratio, r_dims)
    ref = None
    if reference is not None:
        ref, ref_tok, ref_name = load_model(reference)
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise KvxError(
                f"--reference {reference} has another tokenizer than {model}: attention maps would not align"
            )
        get_adapter(ref.config)

    windows = text_windows(base, tokenizer, data, tokens, seq_len, cache_key=resolve(model)[0])
    settings = ProfileSettings(sink=sink, window=window, topk=topk)
    col = run_profile(base, adapter, windows, settings, on_batch=progress("profiling", windows.numel()))

    layers, spectra, lazy = [], [], []
    m = r_dims // (2 * n_kv)
    for i in range(adapter.n_layers):
        attn, st, lp = adapter.attention(base, i), col.stats[i], col.layers[i]
        w = adapter.attention_weights(attn)
        cov = st.covariance
        pairs = select_pairs("2norm", n_kv, hd, m, st.pair_score)
        jkv = joint_kv(
            w.wk, w.wv, w.bk, n_kv=n_kv, head_dim=hd, pairs=pairs, cov=cov, k_gain=adapter.k_norm_weight(attn)
        )
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
        probe = windows[:2, : cfg.xscale_tokens]
        sims = cross_scale_similarity(
            attention_maps(base, adapter, probe), attention_maps(ref, get_adapter(ref.config), probe)
        )
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
    curves = None
    if cfg.allocate != "spectrum":
        full = 2 * n_kv * hd
        ranks = rank_grid(max(1.0, full / target_kv_ratio - r_dims), full_rank(n_kv, hd, 2 * n_kv, hidden))
        ropes = rope_grid(r_dims, 2 * n_kv, n_kv * hd)
        curves = sweep(
            base, adapter, windows, ranks, ropes, cfg.allocate, on_layer=progress("sensitivity sweep", adapter.n_layers)
        )
        for layer, curve in zip(layers, curves):
            layer["sensitivity"] = {str(rope): {str(r): s for r, s in c.items()} for rope, c in curve.scores.items()}
    if cfg.mapped:
        plan = _mapped_plan(sims["heads"], cfg, reference, adapter, tokenizer, name)
    elif cfg.condensed:
        sim = report["cross_layer_similarity"]
        similarity = [[(k + v) / 2 for k, v in zip(rk, rv)] for rk, rv in zip(sim["k"], sim["v"])]
        plan = suggest_condensed(geom, similarity, target_kv_ratio, seq_len, name)
    else:
        plan = suggest_plan(
            geom,
            spectra,
            lazy,
            target_kv_ratio,
            r_dims,
            streaming,
            cfg.lazy_threshold,
            sink=sink,
            window=window,
            context=seq_len,
            base_model=name,
            curves=curves,
            allocation=cfg.allocate,
        )
    report["suggested_plan"] = plan.to_dict()
    report["expected_kv_ratio"] = plan.meta["expected_kv_ratio"]
    if cfg.mapped:
        report["mapping"] = plan.meta["mapping"]
        note(plan.meta["mapping"]["summary"])
    with atomic_dir(out, overwrite) as tmp:
        files = write_report(report, plan, tmp)
    report["files"] = [str(Path(out) / f.name) for f in files]
    return report


def _mapped_plan(heads, cfg: ProfileConfig, reference: str, adapter, tokenizer, name) -> Plan:
    """IAM's plan (``suggest_mapped``), its reference described as ``kvx convert --plan`` needs it and
    its net KV and FLOP change (the reference model's cost included)."""
    from ..methods.mapped import describe_reference, net_figures

    plan = suggest_mapped(heads, cfg.mapped, cfg.map_order, name)
    plan.meta = {"suggested_by": "kvx profile", "allocation": f"mapped ({cfg.map_order} order)"}
    plan.meta[REFERENCE_KEY] = describe_reference(reference, plan, adapter, tokenizer)
    plan.meta["mapping"] = net_figures(plan, adapter)
    plan.meta["expected_kv_ratio"] = round(1 / (1 + plan.meta["mapping"]["kv_change"]), 3)
    return plan
