"""Long-context evaluation: loss on the last part of long documents, and the cache at that length.

One forward per document with the model's own cache: the tail's next-token loss (only the
last ``tail + 1`` logits are formed) and, from the same cache object, the bytes it holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import long_documents
from ..measure.kv import checked_nbytes, kv_bytes_per_token_spec, new_cache
from ..modeling.modeling_kvx import cache_kwargs


@torch.no_grad()
def long_context(model, tokenizer, data: str, context: int, tail: int = 1024, max_docs: int = 4, on_doc=None) -> dict:
    """Perplexity of the last ``tail`` tokens of ``context``-token document prefixes, and KV bytes/token."""
    if not 0 < tail < context:
        raise ValueError(f"tail {tail} must be between 1 and context {context}")
    docs = long_documents(tokenizer, data, "eval", context, max_docs)
    nll, count, nbytes = 0.0, 0, None
    for ids in docs:
        ids = ids[None].to(model.device)
        cache = new_cache(model)
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=tail + 1, **cache_kwargs(model, cache)).logits
        targets = ids[:, -tail:]
        nll += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
        nbytes = checked_nbytes(model, cache, context) if nbytes is None else nbytes
        del cache, logits
        if on_doc:
            on_doc(1)
    return {
        "context": context,
        "tail": tail,
        "docs": len(docs),
        "ppl_tail": math.exp(nll / count),
        "kv_bytes_per_token": nbytes / context,
        "kv_bytes_per_token_spec": kv_bytes_per_token_spec(model, context),
    }
