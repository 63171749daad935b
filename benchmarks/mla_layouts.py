"""What the DeepSeek-V3 layout costs: per-KV-head RoPE keys vs one shared RoPE key vs shared + latent norm.

All rows convert the bundled SmolLM2-135M at the same 4x KV cut (96 cached floats per token
and layer; SmolLM2 caches 384) and are evaluated on the same windows:

- kvx layout: a RoPE key per KV head (6 pairs each, 36 dims) + a 60-float latent;
- shared: one RoPE key of 16 dims for all heads (TransMLA's per-frequency PCA) + 80 latent;
- deepseek: shared + DeepSeek-V3's RMS norm on the latent: what `--export deepseek` writes.

Then a short distillation (the same for every row) shows what healing does to each.

    python benchmarks/mla_layouts.py [--distill-tokens 16384] [--eval-tokens 8192] [--out runs/bench-layouts]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from kvx.convert import convert
from kvx.data import token_windows
from kvx.distill import distill
from kvx.eval import perplexity
from kvx.loading import load_model

ROWS = [  # label, layout, rope_select, kv_rank, rope_dims
    ("kvx, 2-norm pairs per KV head", "kvx", "2norm", 60, 36),
    ("kvx, high-freq pairs per KV head", "kvx", "high", 60, 36),
    ("shared RoPE key (high-freq)", "shared", "high", 80, 16),
    ("deepseek: shared key + latent norm", "deepseek", "high", 80, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distill-tokens", type=int, default=16384, help="0: no distillation")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default="runs/bench-layouts")
    a = ap.parse_args()
    out = Path(a.out)
    base = load_model("smollm2-135m")
    windows = token_windows(base[1], "bundled", "eval", a.eval_tokens, 512)
    base_ppl = perplexity(base[0], windows)
    results = []
    for label, layout, select, rank, rope in ROWS:
        conv_dir = out / f"{layout}-{select}"
        kv = convert(
            "smollm2-135m",
            conv_dir,
            kv_rank=rank,
            rope_dims=rope,
            rope_select=select,
            layout=layout,
            calib="bundled",  # kvx 0.1's conversion, as the README table was measured
            init="pca",
            fit_steps=0,
            overwrite=True,
            loaded=base,
        )["kv"]
        before = perplexity(load_model(str(conv_dir))[0], windows)
        after = None
        if a.distill_tokens:
            healed = out / f"{layout}-{select}-healed"
            distill(str(conv_dir), healed, tokens=a.distill_tokens, lr=3e-4, overwrite=True)
            after = perplexity(load_model(str(healed))[0], windows)
        results.append((label, rank, rope, kv["baseline"] / kv["measured"], before, after))
        print(json.dumps(results[-1]), flush=True)

    device = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    print(
        f"\nSmolLM2-135M-Instruct (bundled), float32, {device}. Perplexity: {windows.shape[0]} windows of 512 "
        "tokens of the"
    )
    print(
        f"bundled evaluation text; original model {base_ppl:.2f}. Distillation: `kvx distill` defaults with lr "
        f"3e-4, {a.distill_tokens} tokens.\n"
    )
    print("| layout | kv_rank | RoPE dims | KV cut | ppl, converted | ppl, after distillation |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, rank, rope, ratio, before, after in results:
        shown = f"{after:.2f}" if after is not None else "not run"
        print(f"| {label} | {rank} | {rope} | {ratio:.2f}x | {before:.2f} | {shown} |")


if __name__ == "__main__":
    main()
