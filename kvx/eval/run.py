"""``kvx eval``: a model (and optionally its baseline) on the same windows, as one JSON object."""

from __future__ import annotations

from ..errors import KvxError
from ..loading import load_model
from ..progress import Progress, no_progress
from . import compare, continuations, evaluate_model, long_context
from .config import EvalConfig
from .downstream import check, score


def evaluate(
    model: str,
    baseline: str | None = None,
    cfg: EvalConfig | None = None,
    *,
    progress: Progress = no_progress,
    **options,
) -> dict:
    """``kvx eval``: the JSON object with model/baseline rows and kv_ratio/ppl_ratio (plus, for
    each ``long`` context, tail perplexity and cache bytes of long documents; each task's scores
    and the share of the baseline's kept; the agreement of greedy continuations)."""
    cfg = cfg or EvalConfig(**options)
    for ctx in cfg.long or []:
        if not 0 < cfg.long_tail < ctx:
            raise KvxError(f"--long-tail {cfg.long_tail} must be below every --long context ({ctx})")
    for name, value, least in (
        ("limit", cfg.limit, 1),
        ("task-batch", cfg.task_batch, 1),
        ("prompts", cfg.prompts, 0),
        ("new-tokens", cfg.new_tokens, 1),
    ):
        if value is not None and value < least:
            raise KvxError(f"--{name} {value} must be at least {least}")
    if cfg.tasks:
        check(cfg.tasks)
    rows = []
    for ref in (model, baseline):
        if ref is None:
            rows.append(None)
            continue
        m, tok, _ = load_model(ref)
        advance = progress(f"evaluating {ref}", cfg.max_tokens // cfg.seq_len * cfg.seq_len)
        row = evaluate_model(m, tok, cfg.data, cfg.max_tokens, cfg.seq_len, on_batch=advance)
        row["name"] = ref
        if cfg.prompts:
            row["generations"] = continuations(m, tok, cfg.data, cfg.prompts, cfg.new_tokens)
        if cfg.tasks:
            row["tasks"] = score(m, tok, cfg.tasks, cfg.limit, cfg.task_batch)
        if cfg.long:
            limit = getattr(m.config, "max_position_embeddings", None)
            if limit and max(cfg.long) > limit:
                raise KvxError(f"--long {max(cfg.long)} exceeds {ref}'s {limit} positions")
            row["long"] = {
                str(ctx): long_context(
                    m,
                    tok,
                    cfg.data,
                    ctx,
                    cfg.long_tail,
                    cfg.long_docs,
                    on_doc=progress(f"{ref} at {ctx} tokens", cfg.long_docs),
                )
                for ctx in cfg.long
            }
        rows.append(row)
        del m
    return compare(rows[0], rows[1])
