"""``kvx eval``'s config: which text, how many tokens, which long contexts."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import int_list, opt


@dataclass(frozen=True)
class EvalConfig:
    data: str = opt("bundled", "Text: 'bundled', a file/folder, or hf:NAME[:CONFIG][:SPLIT].")
    max_tokens: int = opt(8192, "Evaluation tokens.")
    seq_len: int = opt(512, "Window length (tokens).")
    long: list[int] | None = opt(
        None,
        "Long contexts to evaluate too, e.g. '4096,8192': tail perplexity of long documents and cache bytes.",
        parse=int_list,
        text="CONTEXTS",
    )
    long_tail: int = opt(1024, "Tokens at the end of each long prefix whose loss is measured.")
    long_docs: int = opt(4, "Long documents per context.")
