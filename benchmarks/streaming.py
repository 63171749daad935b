"""Streaming layers on the bundled SmolLM2-135M: which layers to make streaming matters?

For 25%, 50% and 75% of the layers as streaming (sink 4, window 1020), chosen by lazy ratio
(measured on the calibration text), at random (seed 0) or as the last layers, it reports
the perplexity of the last 1024 tokens of 4k- and 8k-token prefixes of the longest
evaluation documents, and the KV bytes per token the real cache holds at that length.
No training. The models are built in memory from the base weights (streaming changes no
weight), exactly as `kvx convert --to streaming` would write them.

    python benchmarks/streaming.py [--contexts 4096,8192] [--docs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys

import torch

from kvx.arch import get_adapter
from kvx.convert.assemble import convert_model
from kvx.convert.scores import lazy_ratios
from kvx.eval import long_context
from kvx.loading import load_model
from kvx.plan import FullSpec, Plan, StreamingSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--tail", type=int, default=1024)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]

    base, tok, _ = load_model("smollm2-135m")
    adapter = get_adapter(base.config)
    n = adapter.n_layers
    lazy = lazy_ratios(base, tok, adapter, "bundled", a.sink, a.window)
    by_lazy = sorted(range(n), key=lambda i: -lazy[i])
    shuffled = random.Random(0).sample(range(n), n)

    def row(name, model):
        results = [long_context(model, tok, "bundled", c, a.tail, a.docs) for c in contexts]
        print(f"done: {name}", file=sys.stderr, flush=True)
        return name, results

    rows = [row("base model (all full)", base)]
    for share in (0.25, 0.5, 0.75):
        k = round(share * n)
        for how, order in (("lazy ratio", by_lazy), ("random", shuffled), ("last layers", list(range(n - 1, -1, -1)))):
            chosen = set(order[:k])
            plan = Plan([StreamingSpec(a.sink, a.window) if i in chosen else FullSpec() for i in range(n)])
            rows.append(row(f"{k}/{n} streaming by {how}", convert_model(base, plan)[0]))

    base_res = rows[0][1]
    print(
        f"\nSmolLM2-135M-Instruct (bundled, float32), streaming layers with sink {a.sink} + window {a.window}, no "
        "training."
    )
    print(
        f"Perplexity of the last {a.tail} tokens of {a.docs} documents (the longest New Testament books) cut to "
        "each context."
    )
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}.")
    print(
        f"Lazy ratios (sink {a.sink} + last {a.window}, calibration text): " + " ".join(f"{x:.2f}" for x in lazy) + "\n"
    )
    head = " | ".join(f"ppl @{c} | ppl ratio @{c} | KV bytes/token @{c} | KV ratio @{c}" for c in contexts)
    print(f"| layers | {head} |")
    print("| --- |" + " --- |" * (4 * len(contexts)))
    for name, results in rows:
        cells = []
        for r, b in zip(results, base_res):
            cells += [
                f"{r['ppl_tail']:.3f}",
                f"{r['ppl_tail'] / b['ppl_tail']:.3f}",
                f"{r['kv_bytes_per_token']:.0f}",
                f"{b['kv_bytes_per_token'] / r['kv_bytes_per_token']:.2f}x",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
