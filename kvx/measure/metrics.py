"""Per-layer profile metrics as pure functions of attention probabilities and activations.

Attention rows are produced a chunk of queries at a time (``attention_chunks``) so that a
long profile never holds a full ``T x T`` map per head; each metric folds a chunk into
running sums.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def attention_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Causal softmax attention ``[B, H, c, T]`` (float32) for successive query chunks.

    ``q [B, H, Tq, d]``, ``k [B, H_kv, T, d]``; grouped KV heads are repeated as in GQA. The
    queries are those of the last ``Tq`` positions, so a caller that needs only the last rows
    computes only those.
    ``sliding_window`` follows transformers: a query sees its last ``window`` keys itself included.
    """
    t = q.shape[-2]
    start = k.shape[-2] - t
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
    keys = torch.arange(k.shape[-2], device=q.device)
    for c0 in range(0, t, chunk):
        qc = q[:, :, c0 : c0 + chunk].float()
        rows = torch.arange(start + c0, start + c0 + qc.shape[-2], device=q.device)[:, None]
        allowed = keys[None, :] <= rows
        if sliding_window is not None:
            allowed &= keys[None, :] > rows - sliding_window
        scores = (qc @ k.transpose(-1, -2)) * scaling
        yield c0, scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def lazy_mass(probs: torch.Tensor, c0: int, sink: int, window: int) -> tuple[torch.Tensor, int]:
    """Per head: summed attention mass on the first ``sink`` keys plus the last ``window`` keys
    (the query itself included), over the chunk's queries at positions ``>= sink + window``.

    Returns (sum per head ``[H]``, number of queries counted per head)."""
    pos = torch.arange(c0, c0 + probs.shape[-2], device=probs.device)
    keep = pos >= sink + window
    if not keep.any():
        return probs.new_zeros(probs.shape[1]), 0
    p = probs[:, :, keep]
    pos = pos[keep]
    cum = p.cumsum(-1)
    upto = cum.gather(-1, pos.view(1, 1, -1, 1).expand(*p.shape[:2], -1, 1))[..., 0]
    before = cum.gather(-1, (pos - window).view(1, 1, -1, 1).expand(*p.shape[:2], -1, 1))[..., 0]
    mass = p[..., :sink].sum(-1) + (upto - before)
    return mass.sum(dim=(0, 2)), p.shape[0] * p.shape[2]


def topk_recall(probs: torch.Tensor, prev_row: torch.Tensor | None, c0: int, k: int):
    """Per head: how many of query ``t``'s top-``k`` keys were also query ``t-1``'s top-``k``
    (AttentionPredictor's premise that attention is predictable step to step), as a share of k.

    ``prev_row`` is the last row of the previous chunk. Returns (sum per head, count, last row)."""
    rows = probs if prev_row is None else torch.cat([prev_row, probs], dim=-2)
    first = c0 if prev_row is None else c0 - 1
    top = rows.topk(k, dim=-1).indices
    member = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, top, True)
    hits = member[:, :, :-1].gather(-1, top[:, :, 1:]).sum(-1).float() / k  # row i+1 vs row i
    pos = torch.arange(first + 1, first + rows.shape[-2], device=probs.device)
    valid = pos >= k + 1  # row t-1 must have at least k keys
    hits = hits[:, :, valid]
    return hits.sum(dim=(0, 2)), hits.shape[0] * hits.shape[2], probs[:, :, -1:]


def energy_ranks(evals: torch.Tensor, levels=(0.90, 0.95, 0.99)) -> dict[str, int]:
    """Smallest rank keeping each share of the spectrum's energy (``evals`` descending)."""
    share = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
    out = {f"rank_{round(p * 100)}": int((share < p - 1e-12).sum().item()) + 1 for p in levels}
    out["dims"] = int(evals.numel())
    return out


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a [n, d]`` with every row of ``b [m, d]``."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T
