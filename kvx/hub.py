"""Model cards (and, later, pushing to the Hub)."""

from __future__ import annotations

from .plan import Plan


def model_card(base_model: str, plan: Plan, kv: dict, extra: dict | None = None) -> str:
    """A README.md for a converted checkpoint: what it is, its plan, its measured cache size."""
    extra = extra or {}
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: transformers",
        "tags: [kvx, mla, kv-cache-compression]",
        "---",
        "",
        f"# {base_model}, converted by kvx",
        "",
        f"Base model: `{base_model}`. Plan: {plan.summary()}.",
        "",
        "| KV cache | bytes/token |",
        "| --- | --- |",
        f"| base model | {kv['baseline']:.0f} |",
        f"| this model (measured from the cache object) | {kv['measured']:.0f} |",
        f"| this model (from the plan) | {kv['spec']:.0f} |",
        f"| ratio | {kv['baseline'] / kv['measured']:.2f}x |",
        "",
        f"Measured after a forward of {kv['tokens']} tokens at {kv['dtype']}.",
        "",
    ]
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        "```",
        "",
        "The modeling code ships in this folder (`modeling_kvx.py`, torch + transformers only).",
        "Without `trust_remote_code=True` transformers would build the plain base architecture",
        "and leave the converted layers uninitialised: always pass it.",
        "",
        "## Plan",
        "",
        "```yaml",
        plan.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def deepseek_card(source: str, plan: Plan, config) -> str:
    """README.md of a DeepSeek-V3 export: where it came from, its shape, how to load and serve it."""
    return "\n".join(
        [
            "---",
            f"base_model: {plan.base_model}",
            "library_name: transformers",
            "tags: [kvx, mla, deepseek_v3, kv-cache-compression]",
            "---",
            "",
            f"# {plan.base_model}, converted to DeepSeek-V3 multi-head latent attention by kvx",
            "",
            f"Exported from the kvx checkpoint `{source}` ({plan.summary()}). Same function, DeepSeek-V3 layout:",
            f"latent `kv_lora_rank={config.kv_lora_rank}`, one shared RoPE key `qk_rope_head_dim={config.qk_rope_head_dim}`",
            f"(interleaved, `rope_theta={config.rope_parameters['rope_theta']:.6g}`), dense MLP in every layer",
            f"(`first_k_dense_replace={config.first_k_dense_replace}`), no q LoRA. Per token and layer the cache holds",
            f"{config.kv_lora_rank + config.qk_rope_head_dim} floats.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("PATH")  # DeepseekV3ForCausalLM, no remote code',
            "```",
            "",
            "MLA serving engines that read DeepSeek-V3 configs (vLLM, SGLang) load it as a DeepSeek-V3 model.",
            "",
        ]
    )
