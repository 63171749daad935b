"""Training-free MLA quality on the bundled SmolLM2-135M, and what a conversion costs.

For KV ratios of about 2x, 4x and 8x it converts with `kvx convert` three ways:
weights-only SVD with the highest-frequency RoPE pairs, activation-aware (PCA on
calibration text) with the same pairs, and activation-aware with the 2-norm pair choice
(MHA2MLA). Each conversion runs as its own process so that its wall time and peak RSS
are its own. Perplexity uses the same evaluation windows for every row.

    python benchmarks/mla_quality.py [--eval-tokens 8192] [--ratios 2,4,8] [--out runs/bench-mla]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvx.data import token_windows
from kvx.eval import perplexity
from kvx.loading import load_model
from kvx.measure.kv import kv_bytes_per_token

# SmolLM2-135M caches 2 x 3 KV heads x 64 = 384 floats per token and layer.
SETTINGS = {2: (144, 48), 4: (60, 36), 8: (30, 18)}  # ratio -> (kv_rank, rope_dims)
# kvx 0.1's calibrated conversion (bundled text, PCA, no fitting): benchmarks/healing.py compares the new ones.
KVX01 = ["--calib", "bundled", "--init", "pca", "--fit-steps", "0"]
METHODS = {  # name -> extra convert flags
    "weights-only SVD, high-freq RoPE": ["--calib", "none", "--rope-select", "high"],
    "activation-aware, high-freq RoPE": [*KVX01, "--rope-select", "high"],
    "activation-aware, 2-norm RoPE": [*KVX01, "--rope-select", "2norm"],
}


# A small launcher process runs the conversion and reports its child's peak RSS. Measuring a
# direct child of this process would not work: Linux carries a forked child's inherited
# high-water mark (this process holds a model) across exec into ru_maxrss.
LAUNCHER = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def run_convert(args: list[str]) -> tuple[float, float]:
    """Run one `kvx convert` process; return (wall seconds, its peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "kvx.cli", "convert", *args],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kvx convert {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall, int(proc.stdout.split()[-1]) / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--out", default="runs/bench-mla")
    a = ap.parse_args()
    out = Path(a.out)

    base, tok, _ = load_model("smollm2-135m")
    windows = token_windows(tok, "bundled", "eval", a.eval_tokens, a.seq_len)
    model_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    base_ppl = perplexity(base, windows)
    base_kv = kv_bytes_per_token(base, windows[:1])
    del base

    rows = []
    for ratio in (int(r) for r in a.ratios.split(",")):
        rank, rope = SETTINGS[ratio]
        for name, flags in METHODS.items():
            target = out / f"x{ratio}-{name.split(',')[0].split()[0]}-{flags[-1]}"
            wall, rss = run_convert(
                [
                    "smollm2-135m",
                    "--to",
                    "mla",
                    "--kv-rank",
                    str(rank),
                    "--rope-dims",
                    str(rope),
                    "-o",
                    str(target),
                    "--overwrite",
                    *flags,
                ]
            )
            model, _, _ = load_model(str(target))
            ppl = perplexity(model, windows)
            kv = kv_bytes_per_token(model, windows[:1])
            rows.append((base_kv / kv, rank, rope, name, ppl, ppl / base_ppl, wall, rss))
            del model
            print(f"done: {ratio}x {name}: ppl {ppl:.2f}", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M-Instruct (bundled, float32), {windows.numel()} eval tokens of the bundled New Testament")
    print(f"in windows of {a.seq_len}; calibration 16384 tokens of the Old Testament; no training.")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, float32."
    )
    print(f"Base model: perplexity {base_ppl:.2f}, {base_kv:.0f} KV bytes/token, weights {model_mib:.0f} MiB.\n")
    print(
        "| KV ratio | kv_rank | rope_dims | initialisation | perplexity | ppl / base | convert wall (s) | convert "
        "peak RSS (MiB) | RSS / weights |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ratio, rank, rope, name, ppl, rel, wall, rss in rows:
        print(
            f"| {ratio:.2f}x | {rank} | {rope} | {name} | {ppl:.2f} | {rel:.2f} | {wall:.1f} | {rss:.0f} | "
            f"{rss / model_mib:.1f} |"
        )


if __name__ == "__main__":
    main()
