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
