"""Training sequences for distillation: packed windows of DATA, text the teacher writes, or a mix."""

from __future__ import annotations

from ..errors import KvxError
from ..generate import text_windows


def training_windows(
    teacher, tokenizer, data: str, n_tokens: int, seq_len: int, seed: int = 0, on_window=None, cache_key=None
):
    """DATA's training windows (``teacher`` text is cached by ``cache_key``)."""
    if n_tokens < seq_len:
        raise KvxError(f"--tokens {n_tokens} is less than one sequence of {seq_len}")
    return text_windows(teacher, tokenizer, data, n_tokens, seq_len, seed, cache_key, on_window)
