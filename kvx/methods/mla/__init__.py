"""``mla``: multi-head latent attention upcycled from MHA/GQA.

Papers: X-EcoMLA ("Upcycling Pre-Trained Attention into MLA for Efficient and Extreme
KV Compression", Li et al. 2025), MHA2MLA ("Towards Economical Inference: Enabling
DeepSeek's Multi-Head Latent Attention in Any Transformer-based LLMs", Ji et al. 2025) and
TransMLA ("TransMLA: Multi-Head Latent Attention Is All You Need", Meng et al. 2025). The
maths of one layer is in ``maths.py``; this file is what kvx's stages ask of the method.
"""

from __future__ import annotations

import torch

from ...errors import KvxError
from ...modeling.kvx_specs import MLASpec
from ..base import LayerInput, LayerOutput, Method, Option
from .maths import (
    LAYOUTS,
    ROPE_SELECTIONS,
    SHARED_ROPE_SELECTIONS,
    OutputWeighting,
    convert_layer_to_mla,
    convert_layer_to_shared_mla,
    full_rank,
    validate_mla_dims,
    validate_rope_dims,
)

# Base tensors an MLA layer does not carry over, and why (prefix inside the attention module).
_DROPPED = {
    "k_proj.": "factored into the latent (kv_a_proj/kv_b_proj) and k_rope_proj",
    "v_proj.": "factored into the latent (kv_a_proj/kv_b_proj)",
    "k_norm.": "its gain is folded into kv_b_proj and k_rope_proj; the exact 1/rms comes from k_scale_proj",
}
_CARRIED = ("q_proj.", "o_proj.", "q_norm.")
INITS = ("pca", "output", "best")


def default_init(calibrated: bool) -> str:
    """``best`` where there are statistics to weigh and a held-out batch to judge by (it beat
    ``pca`` on the bundled text and on wiki at 4x and 8x); ``pca`` (weights only) without."""
    return "best" if calibrated else "pca"


OUTPUT_BETAS = (0.5, 1.0, 2.0)  # key/value weightings tried by --init output (the measured best is kept)


class MLAMethod(Method):
    kind = "mla"
    spec_type = MLASpec
    options = {
        "kv_rank": Option(str, "mla: latent floats per token and layer, or 'full' (lossless)."),
        "rope_dims": Option(str, "mla: RoPE key floats per token and layer (all KV heads together), or 'all'."),
        "rope_select": Option(
            str, "mla: which frequency pairs to keep: 2norm (default with calibration), high, low, uniform."
        ),
        "layout": Option(
            str,
            "mla: kvx (a RoPE key per KV head), shared (one RoPE key for all heads) or deepseek "
            "(shared + latent norm: DeepSeek-V3's attention).",
        ),
    }
    conversion_options = {
        "init": Option(
            str,
            "mla: initialisation of the latent: pca (K/V balanced by energy), output (K/V errors weighted by what "
            "the attention output sees of them: queries, o_proj), or best (each measured on held-out text, per layer; "
            "the default with calibration).",
        ),
    }
    tags = ("mla",)

    def make_spec(self, args: dict, adapter, calibrated: bool) -> MLASpec:
        args = dict(args)
        layout = args.pop("layout", None) or "kvx"
        if layout not in LAYOUTS:
            raise KvxError(f"unknown MLA layout {layout!r} (choose from {', '.join(LAYOUTS)})")
        rope_select = args.pop("rope_select", None) or ("high" if layout != "kvx" or not calibrated else "2norm")
        if rope_select not in ROPE_SELECTIONS:
            raise KvxError(f"unknown --rope-select {rope_select!r} (choose from {', '.join(ROPE_SELECTIONS)})")
        kv_rank, rope_dims = args.pop("kv_rank", "full"), args.pop("rope_dims", "all")
        if args:
            raise KvxError(
                f"mla has no option {', '.join(sorted(args))} (it takes: kv_rank, rope_dims, rope_select, layout)"
            )
        n_kv, hd, hidden = adapter.n_kv_heads, adapter.head_dim, adapter.config.hidden_size
        try:
            r_dims = (n_kv * hd if layout == "kvx" else hd) if str(rope_dims) == "all" else int(rope_dims)
        except ValueError:
            raise KvxError(f"--rope-dims must be an integer or 'all', not {rope_dims!r}") from None
        validate_rope_dims(r_dims, n_kv, hd, layout)
        try:
            rank = full_rank(n_kv, hd, r_dims, hidden, layout) if str(kv_rank) == "full" else int(kv_rank)
        except ValueError:
            raise KvxError(f"--kv-rank must be an integer or 'full', not {kv_rank!r}") from None
        return MLASpec(rank, r_dims, rope_select, layout)

    def check(self, spec: MLASpec, adapter, layer: int) -> None:
        if spec.rope_select not in ROPE_SELECTIONS:
            raise KvxError(f"layer {layer}: unknown rope_select {spec.rope_select!r}")
        if spec.layout not in LAYOUTS:
            raise KvxError(f"unknown MLA layout {spec.layout!r} (choose from {', '.join(LAYOUTS)})")
        if spec.shared:  # DeepSeek-V3's attention: no per-head key norms, only frequencies its RoPE can make
            if adapter.has_qk_norm:
                raise KvxError(
                    f"{adapter.family} RMS-normalises keys per head, which a shared RoPE key cannot express: use "
                    "--layout kvx"
                )
            if spec.rope_select not in SHARED_ROPE_SELECTIONS:
                raise KvxError(
                    f"--rope-select {spec.rope_select!r} cannot feed one shared RoPE key (--layout {spec.layout}): "
                    f"choose {' or '.join(SHARED_ROPE_SELECTIONS)}"
                )
        validate_mla_dims(
            spec.kv_rank, spec.rope_dims, adapter.n_kv_heads, adapter.head_dim, adapter.config.hidden_size, spec.layout
        )

    def needs(self, spec: MLASpec, calibrated: bool, options: dict | None = None) -> frozenset[str]:
        if not calibrated and spec.rope_select == "2norm":
            raise KvxError("--rope-select 2norm needs calibration data: drop --calib none or pick high/low/uniform")
        init = (options or {}).get("init") or default_init(calibrated)
        if init not in INITS:
            raise KvxError(f"--init {init!r}: choose from {', '.join(INITS)}")
        if not calibrated and init != "pca":
            raise KvxError(
                f"--init {init} weighs errors by calibration statistics: drop --calib none or use --init pca"
            )
        return frozenset({"calibration"}) if calibrated else frozenset()

    def convert_candidates(self, spec: MLASpec, layer: LayerInput) -> dict[str, LayerOutput]:
        init = layer.options.get("init") or default_init(layer.stats is not None)
        out = {}
        if init in ("pca", "best"):
            out["pca"] = self.convert_layer(spec, layer)
        if init in ("output", "best"):
            for beta in OUTPUT_BETAS:
                weighting = OutputWeighting(layer.stats.query_covariance, layer.state["o_proj.weight"], beta)
                out[f"output(beta={beta})"] = self._convert(spec, layer, weighting)
        return out

    def convert_layer(self, spec: MLASpec, layer: LayerInput) -> LayerOutput:
        return self._convert(spec, layer, None)

    def _convert(self, spec: MLASpec, layer: LayerInput, weighting: OutputWeighting | None) -> LayerOutput:
        a, w = layer.adapter, layer.weights
        dims = dict(n_kv=a.n_kv_heads, head_dim=a.head_dim, kv_rank=spec.kv_rank, rope_dims=spec.rope_dims)
        common = dict(rope_select=spec.rope_select, stats=layer.stats, weighting=weighting)
        if spec.shared:
            mw = convert_layer_to_shared_mla(
                w.wk, w.wv, w.bk, w.bv, **dims, **common, latent_norm=spec.layout == "deepseek"
            )
        else:
            mw = convert_layer_to_mla(w.wk, w.wv, w.bk, w.bv, **dims, **common, k_gain=layer.k_gain)
        state = {k: v for k, v in layer.state.items() if k.startswith(_CARRIED)}
        dropped = {k: why for k in layer.state for prefix, why in _DROPPED.items() if k.startswith(prefix)}
        if spec.layout == "deepseek" and "q_proj.bias" in state:
            del state["q_proj.bias"]
            dropped["q_proj.bias"] = "DeepSeek-V3's plain q projection has no bias (the deepseek layout drops it)"
        state["kv_a_proj.weight"] = mw.kv_a
        state["kv_b_proj.weight"] = mw.kv_b
        if mw.kv_b_bias is not None:
            state["kv_b_proj.bias"] = mw.kv_b_bias
        if mw.k_rope.shape[0]:
            state["k_rope_proj.weight"] = mw.k_rope
            if mw.k_rope_bias is not None:
                state["k_rope_proj.bias"] = mw.k_rope_bias
        state["rope_pairs"] = mw.rope_pairs
        if mw.rope_mix is not None:
            state["rope_mix"] = mw.rope_mix
        if mw.latent_scale is not None:
            state["kv_a_layernorm.weight"] = torch.full((spec.kv_rank,), mw.latent_scale)
        if layer.k_gain is not None:  # per-head key norms: the original keys feed the exact 1/rms
            for name in ("weight", "bias"):
                if f"k_proj.{name}" in layer.state:
                    state[f"k_scale_proj.{name}"] = layer.state[f"k_proj.{name}"]
                    dropped[f"k_proj.{name}"] = "kept as k_scale_proj (the exact per-head key scale)"
        info = {"share of [K_nope; V] energy kept by the latent": mw.energy_kept}
        if mw.rope_energy_kept is not None:
            info["share of kept-frequency key energy in the shared RoPE key"] = mw.rope_energy_kept
        return LayerOutput(state, dropped, info)

    def nested_ranks(self, spec: MLASpec, layer: LayerInput, ranks: list[int]) -> dict[int, dict]:
        """The ``pca`` layer at each of ``ranks`` (all below ``spec.kv_rank``) from one factorisation:
        principal latents are nested, so the rank-r latent is the first r rows of any larger one
        (what the profile's sensitivity sweep needs at many ranks). The kvx layout below full rank only:
        a full-rank factorisation is exact by the weights, and the deepseek latent norm depends on the rank."""
        if spec.layout != "kvx" or spec.kv_rank >= full_rank(
            layer.adapter.n_kv_heads, layer.adapter.head_dim, spec.rope_dims, layer.adapter.config.hidden_size
        ):
            raise KvxError("nested ranks need the kvx layout below full rank")
        state = self.convert_layer(spec, layer).state
        out = {}
        for r in ranks:
            if not 1 <= r <= spec.kv_rank:
                raise KvxError(f"rank {r} is not between 1 and the factorised rank {spec.kv_rank}")
            cut = dict(state)
            cut["kv_a_proj.weight"] = state["kv_a_proj.weight"][:r].clone()
            cut["kv_b_proj.weight"] = state["kv_b_proj.weight"][:, :r].clone()
            if "kv_a_layernorm.weight" in cut:
                cut["kv_a_layernorm.weight"] = state["kv_a_layernorm.weight"][:r].clone()
            out[r] = cut
        return out

    def trainable(self, spec: MLASpec, layer: int | None = None) -> tuple[str, ...]:
        # k_scale_proj (Qwen3/Gemma3) is the original k_proj: it only feeds the exact per-head
        # 1/rms of the keys, which the healed latent still needs as it was. It stays frozen.
        return ("kv_a_proj", "kv_b_proj", "k_rope_proj", "kv_a_layernorm")
