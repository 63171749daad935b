"""``kvx profile``'s config: what to measure, and the plan it should suggest."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt


@dataclass(frozen=True)
class ProfileConfig:
    data: str = opt(
        "bundled",
        "Text: 'bundled', a file/folder, hf:NAME[:CONFIG][:SPLIT], 'teacher' (the model's own), or a mix (a+b).",
    )
    tokens: int = opt(8192, "Tokens to profile (from DATA's calibration part).")
    seq_len: int = opt(1024, "Sequence length of each profiled window.")
    reference: str | None = opt(
        None, "A smaller model of the same family and tokenizer: cross-scale attention similarity (IAM)."
    )
    sink: int = opt(4, "Attention-sink tokens for the lazy ratio.")
    window: int | None = opt(None, "Recent-window tokens for the lazy ratio (default seq_len/8).")
    topk: int = opt(16, "k of the step-to-step top-k recall.")
    rope_dims: int | None = opt(None, "RoPE dims per token and layer the plan keeps (default: 3/8 of the budget).")
    target_kv_ratio: float = opt(4.0, "KV-size cut the suggested plan aims for.")
    streaming: bool = opt(False, "Let the plan make the laziest layers streaming (sinks + window).")
    lazy_threshold: float = opt(0.9, "A layer this lazy (or lazier) may become streaming.")
    condensed: bool = opt(
        False, "Suggest layer-condensed groups (adjacent layers reading one layer's K/V) instead of MLA."
    )
    allocate: str = opt(
        "spectrum",
        "How the plan sizes each MLA layer: spectrum (pooled [K_nope; V] eigenvalues; instant), output (each layer "
        "converted at a grid of latent and RoPE sizes, scored by its attention-output error against the residual "
        "stream; ~2 min for SmolLM2 on 2 CPU cores) or loss (the same grid scored by the model's next-token KL with "
        "that layer alone converted; a model forward per point).",
    )
    mapped: float = opt(
        0.0,
        "With --reference: suggest a mapped plan (IAM) for this share of the layers instead of MLA (e.g. 0.5).",
    )
    map_order: str = opt(
        "iam",
        "Which layers --mapped picks: iam (the last layer backwards to the middle, then forwards from a quarter "
        "in; never the first eighth) or similar (the layers most like a reference layer first).",
    )
    xscale_tokens: int = opt(256, "Tokens of the cross-scale attention comparison (with --reference).")
