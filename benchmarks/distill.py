"""Healing MLA SmolLM2 with distillation: perplexity after growing token budgets, and throughput.

For each KV ratio it converts the bundled SmolLM2-135M with `kvx convert` (activation-aware,
2-norm RoPE), then runs one `kvx distill` to the largest budget with an evaluation at each
smaller budget, and prints perplexity before and after each budget beside the original
model's, with the run's tokens/s. Budgets must be multiples of one optimizer step
(batch x seq_len tokens).

    python benchmarks/distill.py [--ratios 4,8] [--tokens 262144,1048576,4194304] [--seq-len 256] [--batch-size 4]

On a 2-core CPU a step of 4 x 256 tokens takes about 8 s (~120 tokens/s): 1M tokens is
about 2.5 hours. Use a GPU for the full study (`--mixed-precision bf16` is passed through).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SETTINGS = {2: (144, 48), 4: (60, 36), 8: (30, 18)}  # ratio -> (kv_rank, rope_dims), as in mla_quality.py


def bare_throughput(
    student_dir: Path, seq_len: int, batch_size: int, mixed_precision: str = "no", steps: int = 6
) -> float:
    """Tokens/s of a plain loop on the same batches: teacher forward + student forward/backward + AdamW step,
    no accelerate, no logging: the reference `kvx distill`'s own tokens/s is compared with (BENCH.md).
    On the GPU when there is one (accelerate's choice too), under autocast for bf16/fp16."""
    import contextlib
    import time

    from kvx.arch import get_adapter
    from kvx.data import token_windows
    from kvx.distill.loop import select_trainable
    from kvx.distill.losses import kl_loss
    from kvx.loading import load_model
    from kvx.plan import Plan

    device = "cuda" if torch.cuda.is_available() else None
    student, tokenizer, _ = load_model(str(student_dir), device=device)
    teacher, _, _ = load_model("smollm2-135m", device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(student.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    student.train()
    trainable = select_trainable(student, "converted", Plan.from_config(student.config), get_adapter(student.config))
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    batches = token_windows(tokenizer, "bundled", "calib", steps * batch_size * seq_len, seq_len).split(batch_size)
    times = []
    for ids in batches:
        ids = ids.to(student.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            t_logits = teacher(ids).logits
        with autocast:
            loss = kl_loss(student(ids).logits, t_logits.clone())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # first step warms up
    return batch_size * seq_len / times[len(times) // 2]


def kvx(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvx.cli", *args], stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"kvx {' '.join(args)} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--tokens", default="262144,1048576,4194304")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--out", default="runs/bench-distill")
    a = ap.parse_args()
    budgets = sorted(int(t) for t in a.tokens.split(","))
    step_tokens = a.batch_size * a.seq_len
    if any(b % step_tokens for b in budgets):
        raise SystemExit(f"every budget must be a multiple of {step_tokens} tokens")
    eval_every = budgets[0] // step_tokens
    if any((b // step_tokens) % eval_every for b in budgets):
        raise SystemExit("every budget must be a multiple of the smallest one")
    out = Path(a.out)

    rows = []
    for ratio in (int(r) for r in a.ratios.split(",")):
        rank, rope = SETTINGS[ratio]
        mla, healed = out / f"x{ratio}-mla", out / f"x{ratio}-healed"
        kvx(
            "convert",
            "smollm2-135m",
            "--to",
            "mla",
            "--kv-rank",
            str(rank),
            "--rope-dims",
            str(rope),
            "-o",
            str(mla),
            "--overwrite",
            *("--calib", "bundled", "--init", "pca", "--fit-steps", "0"),  # kvx 0.1's conversion, as in the README
        )
        kvx(
            "distill",
            str(mla),
            "-o",
            str(healed),
            "--overwrite",
            "--tokens",
            str(budgets[-1]),
            "--seq-len",
            str(a.seq_len),
            "--batch-size",
            str(a.batch_size),
            "--lr",
            str(a.lr),
            "--eval-every",
            str(eval_every),
            "--mixed-precision",
            a.mixed_precision,
        )
        summary = json.loads((healed / "distill_summary.json").read_text())
        metrics = [json.loads(line) for line in (healed / "metrics.jsonl").read_text().splitlines()]
        by_tokens = {m["tokens"]: m for m in metrics if "eval_ppl" in m}
        bare = bare_throughput(mla, a.seq_len, a.batch_size, a.mixed_precision)
        rows.append((ratio, rank, rope, summary, [by_tokens.get(b) for b in budgets], bare))
        print(f"done: {ratio}x", file=sys.stderr, flush=True)

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    print(
        "\nSmolLM2-135M-Instruct (bundled), MLA by `kvx convert`, healed by `kvx distill` (KL, converted weights only,"
    )
    print(f"lr {a.lr}, batch {a.batch_size} x {a.seq_len}, {a.mixed_precision} mixed precision) on {device}.")
    print(
        f"Perplexity: {4096 // a.seq_len} windows of {a.seq_len} tokens of the bundled evaluation text (distill's "
        "own evaluation).\n"
    )
    head = " | ".join(f"ppl after {b:,} tokens" for b in budgets)
    print(f"| KV ratio | kv_rank | rope_dims | original model | converted | {head} | tokens/s | bare loop tokens/s |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(budgets) + " --- | --- |")
    for ratio, rank, rope, summary, points, bare in rows:
        cells = [f"{p['eval_ppl']:.2f}" if p else "n/a" for p in points]
        speed = points[-1]["tokens_per_s"] if points[-1] else float("nan")
        print(
            f"| {ratio}x | {rank} | {rope} | {summary['ppl_teacher']:.2f} | {summary['ppl_before']:.2f} | "
            + " | ".join(cells)
            + f" | {speed:.0f} | {bare:.0f} |"
        )


if __name__ == "__main__":
    main()
