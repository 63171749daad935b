"""Per-layer scores a method can choose its layers by (``--layers auto`` / ``--layers 0.25``)."""

from __future__ import annotations

from ..errors import KvxError
from ..generate import mix_parts, text_windows


def lazy_ratios(
    model,
    tokenizer,
    adapter,
    data: str,
    sink: int,
    window: int,
    tokens: int = 8192,
    seq_len: int | None = None,
    progress=None,
) -> list[float]:
    """Each layer's lazy ratio on DATA's calibration part, in windows of ``seq_len`` tokens
    (default ``2 x (sink + window + 1)``, within the model's positions). On SmolLM2 the
    ranking at 8192 tokens was nearly the same as at 2050, at six times the cost."""
    from ..measure.attention import ProfileSettings, run_profile

    seq_len = min(seq_len or 2 * (sink + window + 1), getattr(model.config, "max_position_embeddings", 1 << 30))
    if seq_len <= sink + window:
        raise KvxError(f"sink {sink} + window {window} leaves no room inside the model's {seq_len} positions")
    windows = text_windows(model, tokenizer, data, max(tokens, seq_len), seq_len)
    settings = ProfileSettings(sink=sink, window=window, topk=1)
    on_batch = progress("measuring lazy layers", windows.numel()) if progress else None
    col = run_profile(model, adapter, windows, settings, on_batch=on_batch)
    return [float(col.layers[i].lazy_per_head.mean()) for i in range(adapter.n_layers)]


def _lazy_ratio(model, tokenizer, adapter, spec, cfg, progress) -> list[float]:
    """On the calibration text's corpus part: the model's own text would have to be sampled in
    windows of ~2k tokens for this alone (minutes per window on a CPU), so ``teacher`` is left out."""
    corpus = [p for p in mix_parts(cfg.calib) if p != "teacher"] if cfg.calibrated else []
    data = "+".join(corpus) or "bundled"
    return lazy_ratios(model, tokenizer, adapter, data, spec.sink, spec.window, progress=progress)


# score name (a Method's ``layer_score``) ->
#   (model, tokenizer, adapter, spec, ConvertConfig, progress) -> one score per layer
LAYER_SCORES = {"lazy_ratio": _lazy_ratio}
