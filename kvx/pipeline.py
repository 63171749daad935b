"""Library entry points behind the CLI: each command is one function here."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from .arch import get_adapter
from .calibration import collect_stats
from .checkpoint import check_output, save_checkpoint
from .convert.mla import ROPE_SELECTIONS, convert_layer_to_mla, full_rank, validate_mla_dims, validate_rope_dims
from .data import token_windows
from .errors import KvxError
from .eval import compare, evaluate_model, kv_bytes_per_token, kv_bytes_per_token_spec
from .hub import model_card
from .loading import load_model
from .modeling.modeling_kvx import MLAAttention, kvx_class_for
from .plan import FullSpec, MLASpec, Plan, spec_to_dict

# progress(description, total) -> advance(n); the CLI draws bars, library callers may pass nothing.
Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


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


def _resolve_dims(kv_rank: str | int, rope_dims: str | int, adapter, hidden: int) -> tuple[int, int]:
    n_kv, hd = adapter.n_kv_heads, adapter.head_dim
    try:
        r_dims = n_kv * hd if str(rope_dims) == "all" else int(rope_dims)
    except ValueError:
        raise KvxError(f"--rope-dims must be an integer or 'all', not {rope_dims!r}") from None
    validate_rope_dims(r_dims, n_kv, hd)
    try:
        rank = full_rank(n_kv, hd, r_dims, hidden) if str(kv_rank) == "full" else int(kv_rank)
    except ValueError:
        raise KvxError(f"--kv-rank must be an integer or 'full', not {kv_rank!r}") from None
    validate_mla_dims(rank, r_dims, n_kv, hd, hidden)
    return rank, r_dims


def build_converted(base_model, plan: Plan, layer_weights: dict, k_norm_eps: float | None):
    """A kvx model for ``plan``: base weights everywhere, ``layer_weights`` in the MLA layers."""
    config = copy.deepcopy(base_model.config)
    config.kvx = {**plan.to_dict(), "k_norm_eps": k_norm_eps}
    cls = kvx_class_for(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init is only slower
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = cls(config)
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
            if attn.k_scale_proj is not None:
                base_attn = adapter.attention(base_model, idx)
                attn.k_scale_proj.load_state_dict(base_attn.k_proj.state_dict())
    # Every weight the base checkpoint lacks must be one of the MLA layers' new ones, filled above.
    mla_prefixes = tuple(
        f"{name}.{part}"
        for name, mod in model.named_modules()
        if isinstance(mod, MLAAttention) and mod.layer_idx in layer_weights
        for part in ("kv_a_proj.", "kv_b_proj.", "k_rope_proj.", "k_scale_proj.", "rope_pairs")
    )
    unset = [k for k in result.missing_keys if not k.startswith(mla_prefixes)]
    if unset:
        raise RuntimeError(f"converted model left weights unset: {unset[:5]}")
    model.eval()
    return model


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
) -> dict:
    """``kvx convert MODEL --to mla``: returns a summary (plan, KV bytes, kept energy, output path)."""
    out = Path(out)
    check_output(out, overwrite)
    base, tokenizer, name = load_model(model)
    adapter = get_adapter(base.config)
    rank, r_dims = _resolve_dims(kv_rank, rope_dims, adapter, base.config.hidden_size)
    chosen = parse_layers(layers, adapter.n_layers)
    use_calib = calib.lower() != "none"
    rope_select = rope_select or ("2norm" if use_calib else "high")
    if rope_select not in ROPE_SELECTIONS:
        raise KvxError(f"unknown --rope-select {rope_select!r} (choose from {', '.join(ROPE_SELECTIONS)})")
    if rope_select == "2norm" and not use_calib:
        raise KvxError("--rope-select 2norm needs calibration data: drop --calib none or pick high/low/uniform")

    stats = {}
    if use_calib:
        windows = token_windows(tokenizer, calib, "calib", calib_tokens, calib_seq_len)
        advance = progress("calibrating", windows.numel())
        stats = collect_stats(base, adapter, windows, chosen, on_batch=advance)

    advance = progress("converting layers", len(chosen))
    weights, energies = {}, []
    for idx in chosen:
        attn = adapter.attention(base, idx)
        w = adapter.attention_weights(attn)
        weights[idx] = convert_layer_to_mla(
            w.wk,
            w.wv,
            w.bk,
            w.bv,
            n_kv=adapter.n_kv_heads,
            head_dim=adapter.head_dim,
            kv_rank=rank,
            rope_dims=r_dims,
            rope_select=rope_select,
            stats=stats.get(idx),
            k_gain=adapter.k_norm_weight(attn),
        )
        energies.append(weights[idx].energy_kept)
        advance(1)

    specs = [MLASpec(rank, r_dims, rope_select) if i in weights else FullSpec() for i in range(adapter.n_layers)]
    plan = Plan(specs, name, {"conversion": {"calib": calib if use_calib else "none", "calib_tokens": calib_tokens if use_calib else 0}})
    converted = build_converted(base, plan, weights, adapter.k_norm_eps())

    probe = (torch.arange(calib_seq_len) % base.config.vocab_size)[None]  # cache size does not depend on content
    kv = {
        "baseline": kv_bytes_per_token(base, probe),
        "measured": kv_bytes_per_token(converted, probe),
        "spec": kv_bytes_per_token_spec(converted, probe.shape[-1]),
        "tokens": probe.shape[-1],
        "dtype": "float32",
    }
    extra = {
        "conversion": f"--kv-rank {rank} --rope-dims {r_dims} --rope-select {rope_select} --calib {calib if use_calib else 'none'}",
        "mean share of [K_nope; V] energy kept by the latent": f"{sum(energies) / len(energies):.4f}",
    }
    converted.generation_config = base.generation_config
    save_checkpoint(converted, tokenizer, out, lambda _: model_card(name, plan, kv, extra), overwrite=overwrite)
    return {"out": str(out), "plan": plan, "kv": kv, "energy_kept": energies}


def evaluate(
    model: str,
    baseline: str | None = None,
    data: str = "bundled",
    max_tokens: int = 8192,
    seq_len: int = 512,
    progress: Progress = _no_progress,
) -> dict:
    """``kvx eval``: the JSON object with model/baseline rows and kv_ratio/ppl_ratio."""
    rows = []
    for ref in (model, baseline):
        if ref is None:
            rows.append(None)
            continue
        m, tok, _ = load_model(ref)
        advance = progress(f"evaluating {ref}", max_tokens // seq_len * seq_len)
        row = evaluate_model(m, tok, data, max_tokens, seq_len, on_batch=advance)
        row["name"] = ref
        rows.append(row)
        del m
    return compare(rows[0], rows[1])
