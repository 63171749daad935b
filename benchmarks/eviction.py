"""KV eviction on the bundled SmolLM2-135M: what each policy keeps at a fixed token budget.

For every policy (``recent`` = StreamingLLM, ``h2o``, ``snapkv``, ``previous`` = the previous
step's attention, ``predictor`` = AttentionPredictor's CNN) and budget, on all layers but the
first two (AttentionPredictor's choice), it reports: the perplexity of the last ``--tail``
tokens of ``context``-token prefixes of the longest evaluation documents, the prefix
prefilled and the tail fed after it (so the tail really runs against the evicted cache, as
generation does); a synthetic passkey retrieval (a five-digit key in filler text at several
depths, answered greedily after the prompt); decode tokens/s after the prompt; and the cache
bytes the model really holds, checked against the plan. Beside them, the full cache. Built in
memory from the base weights exactly as ``kvx convert --to evict`` writes them; the predictor
is trained once by ``kvx convert``'s own code on the bundled calibration text (or read from
``--predictor CHECKPOINT``) and shared by every budget, as it is by every layer.

    python benchmarks/eviction.py [--contexts 4096,8192] [--budgets 256,512,1024] [--predictor DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from kvx.convert import convert
from kvx.convert.assemble import convert_model
from kvx.data import long_documents
from kvx.loading import load_model
from kvx.measure.kv import checked_nbytes, new_cache
from kvx.modeling.kvx_common import cache_kwargs
from kvx.modeling.kvx_evict import PREDICTOR
from kvx.modeling.kvx_specs import POLICIES
from kvx.plan import EvictSpec, FullSpec, Plan, spec_string

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@torch.no_grad()
def tail_ppl(model, docs, tail: int) -> float:
    nll, n = 0.0, 0
    for ids in docs:
        ids = ids[None]
        cache = new_cache(model)
        head = model(ids[:, :-tail], logits_to_keep=1, **cache_kwargs(model, cache)).logits
        rest = model(ids[:, -tail:-1], **cache_kwargs(model, cache)).logits
        logits = torch.cat([head, rest], dim=1)[0].float()
        nll += F.cross_entropy(logits, ids[0, -tail:], reduction="sum").item()
        n += tail
    return math.exp(nll / n)


def passkey_prompts(tok, filler: torch.Tensor, context: int, depths, seed: int = 0):
    rng = random.Random(seed)
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    out = []
    for depth in depths:
        key = str(rng.randrange(10000, 100000))
        needle = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        room = context - len(needle) - len(question)
        at = int(room * depth)
        ids = filler[:at].tolist() + needle + filler[at:room].tolist() + question
        out.append((torch.tensor(ids)[None], key))
    return out


@torch.no_grad()
def passkey_and_speed(model, tok, prompts, new_tokens: int = 8):
    """Share of keys answered, decode tokens/s, and the cache bytes after the first prompt."""
    hits, rates, nbytes = 0, [], None
    for ids, key in prompts:
        cache = new_cache(model)
        logits = model(ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits
        nxt, out = logits[:, -1:].argmax(-1), []
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out.append(nxt)
            nxt = model(nxt, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        rates.append(new_tokens / (time.perf_counter() - t0))
        hits += key in tok.decode(torch.cat(out, 1)[0])
        if nbytes is None:
            nbytes = checked_nbytes(model, cache, ids.shape[-1] + new_tokens)
    rates.sort()
    return hits / len(prompts), rates[len(rates) // 2], nbytes


def trained_predictor(path: str | None, spec: EvictSpec, n_layers: int) -> tuple[dict, str]:
    """The predictor's weights: from a converted checkpoint, or trained now by ``kvx convert``
    on the bundled calibration text (layers 2 on, as below); and how it was obtained."""
    import kvx

    if path is None:
        path = tempfile.mkdtemp(prefix="kvx-predictor-")
        result = convert(
            "smollm2-135m", path, to=spec_string(spec), layers=f"2-{n_layers - 1}", calib="bundled", overwrite=True
        )
        how = result["plan"].meta["conversion"]["predictor"]["summary"]
    else:
        how = f"read from {path}"
    weights = getattr(kvx.load(path), PREDICTOR).state_dict()
    return weights, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--tail", type=int, default=256)
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--predictor", default=None, help="a converted checkpoint whose predictor to use")
    ap.add_argument("--offload", action="store_true", help="the offload mode (full K/V in a second store)")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    depths = [float(d) for d in a.depths.split(",")]

    base, tok, _ = load_model("smollm2-135m")
    n = base.config.num_hidden_layers
    filler = torch.cat(long_documents(tok, "bundled", "eval", max(contexts), 4))
    policies = a.policies.split(",")
    predictor, how = None, "not run"
    if "predictor" in policies:
        predictor, how = trained_predictor(a.predictor, EvictSpec(max(budgets), policy="predictor"), n)
    models = [("full cache", None, base)]
    for budget in budgets:
        for policy in policies:
            spec = EvictSpec(budget, sink=64, local=64, block=16, policy=policy, offload=a.offload)
            plan = Plan([FullSpec() if i < 2 else spec for i in range(n)])
            model = convert_model(base, plan)[0]
            if policy == "predictor":
                getattr(model, PREDICTOR).load_state_dict(predictor)
            models.append((policy + (" (offload)" if a.offload else ""), budget, model))

    print(
        f"# benchmarks/eviction.py on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"# SmolLM2-135M, layers 2-{n - 1} evicting (sink 64, local 64, block 16); tail {a.tail} tokens of "
        f"{a.docs} bundled eval documents; passkey at depths {a.depths}"
    )
    print(f"# predictor: {how}")
    print("| context | policy | budget | tail ppl | passkey | decode tok/s | KV bytes held |")
    print("|---|---|---|---|---|---|---|")
    for context in contexts:
        docs = long_documents(tok, "bundled", "eval", context, a.docs)
        prompts = passkey_prompts(tok, filler, context, depths)
        for policy, budget, model in models:
            ppl = tail_ppl(model, docs, a.tail)
            acc, rate, nbytes = passkey_and_speed(model, tok, prompts)
            print(
                f"| {context} | {policy} | {budget or '-'} | {ppl:.2f} | {acc:.0%} | {rate:.1f} | "
                f"{nbytes / 2**20:.1f} MiB |",
                flush=True,
            )
            print(f"done: {context} {policy} {budget}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
