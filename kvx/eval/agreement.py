"""Generation agreement: does the converted model still write what the original writes?

Log-likelihood hides what greedy decoding shows: a model can score within a point of its
teacher and still leave the teacher's continuation after a few tokens. Each evaluated model
keeps its greedy continuations of one fixed prompt set in its row (token ids and text), so any
two rows, of one ``kvx eval`` or of a ``kvx run`` folder, are compared without re-running.
Prompts: openings of the evaluation text (its register) and kvx's seed prompts (others).
"""

from __future__ import annotations

import torch

from ..data import token_windows
from ..errors import KvxError
from ..generate import SEED_PROMPTS

PROMPT_TOKENS = 32  # length of the openings cut from the evaluation text


def prompt_ids(tokenizer, data: str, n: int) -> list[list[int]]:
    """``n`` prompts: half consecutive ``PROMPT_TOKENS``-token stretches of DATA's eval part, half seed prompts."""
    from_text = n - n // 2
    windows = token_windows(tokenizer, data, "eval", from_text * PROMPT_TOKENS, PROMPT_TOKENS).tolist()
    seeds = [tokenizer(p, add_special_tokens=False).input_ids for p in SEED_PROMPTS[: n // 2]]
    return windows + seeds


@torch.no_grad()
def continuations(model, tokenizer, data: str, n: int, new_tokens: int) -> dict:
    """Greedy continuations of the fixed prompts, one prompt at a time (no padding: exactly what
    a user's ``generate()`` call does), always ``new_tokens`` long (EOS does not stop them)."""
    if n <= 0:
        return {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = prompt_ids(tokenizer, data, n)
    tokens = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )
        tokens.append(out[0, len(ids) :].tolist())
    return {
        "prompts": prompts,
        "tokens": tokens,
        "prompt_text": [tokenizer.decode(p) for p in prompts],
        "text": [tokenizer.decode(t) for t in tokens],
    }


def agreement(model_gen: dict, baseline_gen: dict, samples: int = 3) -> dict:
    """How far the model's greedy continuations follow the baseline's: the share of tokens
    before the first divergence, the share of prompts whose whole continuation matches, and a
    few side-by-side samples."""
    if model_gen.get("prompts") != baseline_gen.get("prompts"):
        raise KvxError("generation agreement needs the same prompts for both models (same tokenizer and data)")
    prefixes, lengths = [], []
    for a, b in zip(model_gen["tokens"], baseline_gen["tokens"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same)
        lengths.append(len(b))
    return {
        "prompts": len(prefixes),
        "new_tokens": max(lengths),
        "tokens_before_divergence": sum(prefixes) / len(prefixes),
        "agreement": sum(prefixes) / sum(lengths),
        "exact_match": sum(p == n for p, n in zip(prefixes, lengths)) / len(prefixes),
        "samples": [
            {"prompt": p, "baseline": b, "model": m}
            for p, b, m in list(zip(baseline_gen["prompt_text"], baseline_gen["text"], model_gen["text"]))[:samples]
        ],
    }
