"""Evaluation: perplexity and KV-cache bytes, for a model and optionally its baseline."""

from __future__ import annotations

from collections.abc import Callable

from ..data import token_windows
from ..measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
from ..measure.perplexity import perplexity
from .agreement import agreement, continuations
from .downstream import compare_tasks
from .long import long_context


def evaluate_model(
    model,
    tokenizer,
    data: str = "bundled",
    max_tokens: int = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Perplexity on DATA's eval part and KV bytes per token (spec and measured) at ``seq_len`` tokens."""
    windows = token_windows(tokenizer, data, "eval", max_tokens, seq_len)
    return {
        "ppl": perplexity(model, windows, batch_size, on_batch),
        "kv_bytes_per_token": kv_bytes_per_token(model, windows[:1]),
        "kv_bytes_per_token_spec": kv_bytes_per_token_spec(model, seq_len),
        "tokens": int(windows.numel()),
        "seq_len": seq_len,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def compare(model_row: dict, baseline_row: dict | None) -> dict:
    """The ``kvx eval --json`` object: rows plus ratios (kv: baseline/model, ppl: model/baseline),
    and the same ratios per long context under ``long_context`` when measured."""
    out = {"model": model_row}
    if baseline_row is not None:
        out["baseline"] = baseline_row
        out["kv_ratio"] = baseline_row["kv_bytes_per_token"] / model_row["kv_bytes_per_token"]
        out["ppl_ratio"] = model_row["ppl"] / baseline_row["ppl"]
        if model_row.get("generations") and baseline_row.get("generations"):
            out["agreement"] = agreement(model_row["generations"], baseline_row["generations"])
        if model_row.get("long"):
            out["long_context"] = {
                ctx: {
                    "kv_ratio": baseline_row["long"][ctx]["kv_bytes_per_token"] / row["kv_bytes_per_token"],
                    "ppl_ratio": row["ppl_tail"] / baseline_row["long"][ctx]["ppl_tail"],
                }
                for ctx, row in model_row["long"].items()
            }
    if "tasks" in model_row:
        out["tasks"] = compare_tasks(model_row["tasks"], baseline_row["tasks"] if baseline_row else None)
    return out


__all__ = [
    "agreement",
    "compare",
    "continuations",
    "evaluate",
    "evaluate_model",
    "long_context",
    "kv_bytes_per_token",
    "kv_bytes_per_token_spec",
    "perplexity",
]
from .run import evaluate  # noqa: E402  (the stage entry point; needs the helpers above)
