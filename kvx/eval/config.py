"""``kvx eval``'s config: which text, how many tokens, which long contexts, which downstream tasks."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import int_list, opt
from .downstream import parse_tasks


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
    tasks: list[str] | None = opt(
        None,
        "Downstream tasks, zero-shot, through lm-eval (pip install 'kvx[eval]'): 'default' (arc_easy, "
        "arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa; offline data), mmlu, sciq, a task YAML "
        "file, or an lm-eval task name.",
        parse=parse_tasks,
        text="TASKS",
    )
    limit: int | None = opt(None, "Examples per task: the first N, the same ones for every model (all when unset).")
    task_batch: int = opt(8, "Requests per forward in the downstream tasks.")
    prompts: int = opt(8, "Prompts continued greedily, compared with the baseline's continuations (0: none).")
    new_tokens: int = opt(32, "Tokens generated per prompt for the generation agreement.")
