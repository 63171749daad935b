"""Training sequences for distillation: packed windows of DATA, or text the teacher writes itself."""

from __future__ import annotations

import torch

from ..data import token_windows
from ..errors import KvxError

# Varied openings so that teacher-written text covers more than one register.
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


@torch.no_grad()
def teacher_windows(teacher, tokenizer, n_tokens: int, seq_len: int, seed: int = 0, on_window=None) -> torch.Tensor:
    """``[n, seq_len]`` windows of text sampled from the teacher (no dataset needed)."""
    gen = torch.Generator().manual_seed(seed)
    n_windows = n_tokens // seq_len
    out = []
    for i in range(n_windows):
        prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(teacher.device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        seq = teacher.generate(
            ids,
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            max_new_tokens=seq_len,
            min_new_tokens=seq_len,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )[0]
        out.append(seq[:seq_len].cpu())
        if on_window:
            on_window(seq_len)
    return torch.stack(out)


def training_windows(teacher, tokenizer, data: str, n_tokens: int, seq_len: int, seed: int = 0, on_window=None):
    """DATA's calibration part packed into windows, or ``teacher``-generated windows."""
    if n_tokens < seq_len:
        raise KvxError(f"--tokens {n_tokens} is less than one sequence of {seq_len}")
    if data == "teacher":
        return teacher_windows(teacher, tokenizer, n_tokens, seq_len, seed, on_window)
    return token_windows(tokenizer, data, "calib", n_tokens, seq_len)
