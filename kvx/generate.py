"""Text a model writes itself: calibration and training data from the model's own distribution.

A conversion calibrated on one corpus fits that corpus (the Bible-calibrated 4x SmolLM2 is 11x
the original's perplexity on the Bible, 37x on Wikipedia). The model's own samples, started
from openings in many registers, cover what the model does rather than what one corpus holds.
Windows are sampled in batches (left-padded prompts) and cached under ``$KVX_CACHE/generated``
by model, window length and seed, so a second conversion of the same model samples nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .data import token_windows
from .errors import KvxError
from .loading import cache_root

SEED_PROMPTS = [
    "The history of the city begins",
    "Here is a short story about a lighthouse keeper:",
    "To understand how vaccines work, we first",
    "Dear friend, I am writing to tell you",
    "The recipe calls for",
    "In mathematics, a prime number is",
    "The committee met on Tuesday to discuss",
    "Once upon a time, in a small village,",
    "The following is a conversation between a teacher and a student.",
    "Photosynthesis is the process by which",
    "The old map showed a path through the mountains",
    "When the engine failed, the pilot",
]
BATCH = 16  # windows sampled together: one decoding step serves 16 windows
_FORMAT = 3  # bump when the sampling changes, so stale cached text is not reused


def _cache_file(key: str, seq_len: int, seed: int) -> Path:
    """Where a model's text is kept: a local model's key includes its weight files' sizes and
    times, so a model rewritten in the same folder samples afresh."""
    stamp = [key, str(_FORMAT), str(seq_len), str(seed)]
    folder = Path(key)
    if folder.is_dir():
        stamp += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256("|".join(stamp).encode()).hexdigest()[:24]
    return cache_root() / "generated" / f"{digest}.pt"


def _save(windows: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(windows, tmp)
    tmp.replace(path)


@torch.no_grad()
def _sample(model, tokenizer, prompts: list[str], seq_len: int) -> list[torch.Tensor]:
    """One batch: each prompt, left-padded, continued to ``seq_len`` tokens in all."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    new = max(1, seq_len - min(map(len, ids)))
    out = model.generate(
        input_ids,
        attention_mask=mask,
        do_sample=True,
        top_p=0.95,
        temperature=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=pad,
    )
    return [row[width - len(x) :][:seq_len].cpu() for row, x in zip(out, ids)]


def generated_windows(
    model,
    tokenizer,
    n_tokens: int,
    seq_len: int,
    seed: int = 0,
    cache_key: str | None = None,
    on_window: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``[n, seq_len]`` windows of text sampled from ``model``; cached by ``cache_key`` when given.

    Batch ``b`` is sampled under its own seed, so a longer request extends a cached shorter one
    (only the missing batches are sampled) and a shorter one is its prefix; the cache is written
    after each batch, so an interrupted run keeps what it sampled. ``model`` may be a callable
    returning the model, so that a cached run never loads it."""
    n = n_tokens // seq_len
    path = _cache_file(cache_key, seq_len, seed) if cache_key else None
    windows = torch.load(path, weights_only=True) if path is not None and path.is_file() else None
    have = 0 if windows is None else windows.shape[0]
    if have >= n:
        return windows[:n]
    model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    rows = [] if windows is None else list(windows.unbind(0))
    for b in range(have // BATCH, -(-n // BATCH)):
        torch.manual_seed(seed * 1_000_003 + b)
        prompts = [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(b * BATCH, (b + 1) * BATCH)]
        rows += _sample(model, tokenizer, prompts, seq_len)
        if path is not None:
            _save(torch.stack(rows), path)
        if on_window:
            on_window(min(BATCH, n - b * BATCH) * seq_len)
    return torch.stack(rows)[:n]


def mix_parts(data: str) -> list[str]:
    """The sources of a mix (``teacher+bundled``); a path that exists is one source, ``+`` or not."""
    return [data] if "+" not in data or Path(data).exists() else [p.strip() for p in data.split("+")]


def sampled_tokens(data: str, n_tokens: int) -> int:
    """How many of ``n_tokens`` of DATA the model writes itself (0: none), for a progress bar."""
    parts = mix_parts(data)
    return n_tokens // len(parts) * parts.count("teacher")


def text_windows(
    writer, tokenizer, data: str, n_tokens: int, seq_len: int, seed: int = 0, cache_key=None, on_window=None
) -> torch.Tensor:
    """Calibration or training windows of DATA: a source's calibration part, ``teacher`` (text
    ``writer`` samples), or a mix such as ``teacher+bundled`` (the tokens shared equally, the
    sources' windows interleaved so that every batch holds all of them)."""
    parts = mix_parts(data)
    if n_tokens < seq_len * len(parts):
        raise KvxError(
            f"{n_tokens} tokens are less than one window of {seq_len} per source of {data!r}: "
            f"give at least {seq_len * len(parts)} tokens or one source"
        )
    per = [seq_len * (n_tokens // seq_len // len(parts))] * len(parts)
    got = [
        generated_windows(writer, tokenizer, n, seq_len, seed, cache_key, on_window)
        if part == "teacher"
        else token_windows(tokenizer, part, "calib", n, seq_len)
        for part, n in zip(parts, per)
    ]
    if len(got) == 1:
        return got[0]
    rows = min(g.shape[0] for g in got)
    return torch.stack([g[:rows] for g in got], dim=1).reshape(-1, seq_len)
