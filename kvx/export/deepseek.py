"""``deepseek``: all-MLA plans in the deepseek layout as ``DeepseekV3ForCausalLM`` (dense MLP in
every layer, interleaved RoPE), which vLLM and SGLang serve with their MLA kernels."""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import ArchAdapter, get_adapter
from ..checkpoint import save_checkpoint
from ..errors import KvxError
from ..loading import build_uninitialised
from ..plan import MLASpec, Plan
from .base import Exporter


def _deepseek_geometry(model) -> dict:
    """The one MLA shape every layer shares (the plan guarantees it) for a DeepSeek-V3 config."""
    config = model.config
    adapter = get_adapter(config)
    check_deepseek_plan(Plan.from_config(config), adapter)
    layers = [adapter.attention(model, i) for i in range(adapter.n_layers)]
    attn = layers[0]
    m, pairs = attn.m, attn.rope_pairs[0].tolist()
    stride = pairs[1] - pairs[0] if m > 1 else 1
    if pairs != [j * stride for j in range(m)]:
        raise KvxError(f"kept RoPE pairs {pairs} are not a progression from 0: DeepSeek's RoPE cannot make them")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return {
        "kv_rank": attn.kv_rank,
        "m": m,
        # pair p of head_dim rotates at theta^(-2p/hd); pair j of 2m dims at theta'^(-2j/2m): p = stride*j
        "rope_theta": theta ** (2 * m * stride / attn.head_dim),
        "head_dim": attn.head_dim,
        "bias": any(t is not None for a in layers for t in (a.kv_b_proj.bias, a.o_proj.bias, a.k_rope_proj.bias)),
    }


def deepseek_config(model, geom: dict):
    """A ``DeepseekV3Config`` with dense MLPs everywhere and this model's MLA shape."""
    from transformers import DeepseekV3Config

    c = model.config
    hd, m = geom["head_dim"], geom["m"]
    return DeepseekV3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,  # kv_b_proj expands the latent per query head
        first_k_dense_replace=c.num_hidden_layers,  # no MoE layer
        n_routed_experts=1,
        n_shared_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=geom["kv_rank"],
        q_lora_rank=None,
        qk_rope_head_dim=2 * m,
        qk_nope_head_dim=hd,
        v_head_dim=hd,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": geom["rope_theta"]},
        rope_interleave=True,  # the layout vLLM/SGLang's DeepSeek kernels assume
        attention_bias=geom["bias"],
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        num_nextn_predict_layers=0,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def _interleave(m: int) -> torch.Tensor:
    """Row order taking ``[x1 (m) | x2 (m)]`` to DeepSeek's interleaved pairs ``x1_0, x2_0, x1_1, ...``."""
    return torch.stack([torch.arange(m), torch.arange(m) + m], dim=-1).flatten()


def deepseek_attention_state(attn, ds_scaling: float, with_bias: bool) -> dict:
    """One MLA layer (deepseek layout) as DeepSeek-V3 attention weights, exactly.

    Queries gain the RoPE part each head reads from the shared key (weighted by its KV
    head's mix), interleaved, and absorb the change of softmax scale. K/V up-projections are
    repeated per query head. Biases: the NoPE key bias adds the same score to every key of a
    query (softmax drops it), and the value bias leaves attention as a constant that folds
    into ``o_proj``'s bias. ``with_bias``: the config has ``attention_bias`` (then both biases
    are written, zeros where kvx has none).
    """
    heads, n_kv, hd, m, r = attn.n_heads, attn.n_kv, attn.head_dim, attn.m, attn.kv_rank
    group = heads // n_kv
    perm = _interleave(m)
    f = attn.scaling / ds_scaling
    with torch.no_grad():
        wq = attn.q_proj.weight.view(heads, hd, -1) * f
        pairs = attn.rope_pairs[0]
        rope_idx = torch.cat([pairs, pairs + hd // 2])
        mix = torch.cat([attn.rope_mix, attn.rope_mix], dim=-1).repeat_interleave(group, dim=0)  # [H, 2m]
        q_rot = (wq[:, rope_idx] * mix[..., None])[:, perm]
        w_b = attn.kv_b_proj.weight
        k_up = w_b[: n_kv * hd].view(n_kv, hd, r)
        v_up = w_b[n_kv * hd :].view(n_kv, hd, r)
        kv_b = torch.cat([k_up, v_up], dim=1).repeat_interleave(group, dim=0).reshape(-1, r)
        state = {
            "q_proj.weight": torch.cat([wq, q_rot], dim=1).reshape(-1, wq.shape[-1]),
            "kv_a_proj_with_mqa.weight": torch.cat([attn.kv_a_proj.weight, attn.k_rope_proj.weight[perm]]),
            "kv_a_layernorm.weight": attn.kv_a_layernorm.weight.clone(),
            "kv_b_proj.weight": kv_b,
            "o_proj.weight": attn.o_proj.weight.clone(),
        }
        if not with_bias:
            return state
        zeros = attn.kv_a_proj.weight.new_zeros
        k_rope_bias = attn.k_rope_proj.bias[perm] if attn.k_rope_proj.bias is not None else zeros(2 * m)
        state["kv_a_proj_with_mqa.bias"] = torch.cat([zeros(r), k_rope_bias])
        o_bias = attn.o_proj.bias.clone() if attn.o_proj.bias is not None else zeros(attn.o_proj.out_features)
        if attn.kv_b_proj.bias is not None:
            v_bias = attn.kv_b_proj.bias[n_kv * hd :].view(n_kv, hd).repeat_interleave(group, dim=0).flatten()
            o_bias = o_bias + attn.o_proj.weight @ v_bias
        state["o_proj.bias"] = o_bias
    return state


def to_deepseek(model):
    """A ``DeepseekV3ForCausalLM`` that computes what the kvx ``model`` (all-MLA, deepseek layout) does."""
    from transformers import DeepseekV3ForCausalLM

    geom = _deepseek_geometry(model)
    config = deepseek_config(model, geom)
    ds = build_uninitialised(DeepseekV3ForCausalLM, config)
    ds.to(next(model.parameters()).dtype)
    adapter = get_adapter(model.config)
    prefixes = tuple(adapter.attention_prefix(i) for i in range(adapter.n_layers))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for i, prefix in enumerate(prefixes):  # DeepSeek-V3 keeps the base layout: same module paths
        attn_state = deepseek_attention_state(
            adapter.attention(model, i), adapter.attention(ds, i).scaling, geom["bias"]
        )
        state.update({prefix + k: v for k, v in attn_state.items()})
    result = ds.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or result.unexpected_keys:
        raise KvxError(
            f"DeepSeek export left weights unmatched: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    ds.tie_weights()
    ds.generation_config = model.generation_config
    return ds.eval()


def check_deepseek_plan(plan: Plan, adapter: ArchAdapter) -> None:
    """Refuse, before any work, a plan (or a family) DeepSeek-V3's config cannot hold."""
    problem = adapter.deepseek_export_problem()
    if problem:
        raise KvxError(f"cannot export to DeepSeek-V3: {problem}")
    shapes = {
        (s.kv_rank, s.rope_dims, s.rope_select, s.layout) if isinstance(s, MLASpec) else s.kind for s in plan.layers
    }
    if len(shapes) != 1 or not all(isinstance(s, MLASpec) and s.layout == "deepseek" for s in plan.layers):
        raise KvxError(
            "DeepSeek export needs every layer MLA in the deepseek layout with one kv_rank, rope_dims and rope_select "
            f"(this plan: {plan.summary()})"
        )


class DeepseekExport(Exporter):
    """All-MLA plans in the deepseek layout, as ``DeepseekV3ForCausalLM``."""

    name = "deepseek"
    spec_defaults = {"mla": {"layout": "deepseek"}}  # --export deepseek implies --layout deepseek

    def check(self, plan: Plan, adapter: ArchAdapter) -> None:
        check_deepseek_plan(plan, adapter)

    def write(self, base, converted: Path, tokenizer, adapter, plan, out: Path, overwrite: bool) -> Path:
        from ..hub import deepseek_card
        from ..loading import load

        model = load(str(converted))
        ds = to_deepseek(model)
        card = deepseek_card(str(converted), Plan.from_config(model.config), ds.config)
        return save_checkpoint(ds, tokenizer, out, lambda _: card, overwrite)
