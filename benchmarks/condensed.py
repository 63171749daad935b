"""Layer-condensed KV on SmolLM2-135M: quality and speed of each plan at 2x and 4x KV cuts,
beside MLA at the same cut, converted and after a short distillation.

Rows (SmolLM2 has 30 layers; a cut keeps ``ceil(30 / ratio)`` layers' K/V):
- ``down``: adjacent runs, each reading its first layer (cross-layer attention, no iterative prefill),
  the source's K/V projections the mean of its readers' (``--kv-init mean``); ``down-keep``: the
  same runs, each source keeping its own projections (``--kv-init keep``); ``down-q``: ``down``
  whose distillation also trains the readers' queries (``train_q=true``);
- ``profile``: the runs ``kvx profile --condensed`` chooses from the measured cross-layer similarity;
- ``lckv``: LCKV with warm-up layers: the bottom layers keep their own K/V, all others read the
  top layer (iterative prefill, 7 + 2 passes);
- ``mla``: MLA at the same cut, kvx's default conversion.
Columns: perplexity on the bundled text and on ``wiki`` after 0 and each distillation budget
(`kvx distill`, its defaults), measured KV ratio, prefill and decode tokens/s against the original.

    python benchmarks/condensed.py [--ratios 2,4] [--rows down,profile,lckv,mla] [--tokens 32768,131072]
        [--distill-rows down,down-keep,lckv,mla] [--out runs/bench-condensed] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
N_LAYERS = 30
MLA = {2: (120, 72), 4: (60, 36)}  # ratio -> (kv_rank, rope_dims): 384 floats per layer
TEXTS = ("bundled", "wiki")
PREFILL, DECODE = 512, 32


def down_plan(ratio: int, train_q: bool = False):
    from kvx.plan import CondensedSpec, Plan

    size = math.ceil(N_LAYERS / math.ceil(N_LAYERS / ratio))
    return Plan([CondensedSpec(i - i % size, train_q=train_q) for i in range(N_LAYERS)])


def lckv_plan(ratio: int):
    from kvx.plan import CondensedSpec, FullSpec, Plan

    warm = math.ceil(N_LAYERS / ratio) - 1  # bottom layers with their own K/V; the top layer is the source
    return Plan([FullSpec()] * warm + [CondensedSpec(N_LAYERS - 1)] * (N_LAYERS - warm))


def _speed(model, ids: torch.Tensor, steps: int = DECODE) -> tuple[float, float]:
    """Prefill tokens/s over ``ids`` and decode tokens/s for ``steps`` greedy tokens after it."""
    from kvx.measure.kv import new_cache
    from kvx.modeling.kvx_common import cache_kwargs

    with torch.no_grad():
        cache = new_cache(model)
        t0 = time.perf_counter()
        logits = model(ids, **cache_kwargs(model, cache)).logits
        prefill = ids.shape[1] / (time.perf_counter() - t0)
        token = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        decode = steps / (time.perf_counter() - t0)
    return prefill, decode


def _measure(path_or_model, windows: dict, ids: torch.Tensor) -> dict:
    from kvx.loading import load
    from kvx.measure.kv import kv_bytes_per_token
    from kvx.measure.perplexity import perplexity

    model = load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    prefill, decode = _speed(model, ids)
    return {
        "ppl": {t: perplexity(model, w) for t, w in windows.items()},
        "kv_bytes": kv_bytes_per_token(model, ids[:, :256]),
        "prefill": prefill,
        "decode": decode,
    }


def _convert(row: str, ratio: int, out: Path, loaded) -> None:
    from kvx.convert import convert
    from kvx.profile import profile

    if row == "mla":
        rank, rope = MLA[ratio]
        convert(MODEL, out, overwrite=True, loaded=loaded, kv_rank=rank, rope_dims=rope)
        return
    if row == "profile":
        where = out.with_name(out.name + "-profile")
        profile(MODEL, where, overwrite=True, condensed=True, target_kv_ratio=float(ratio))
        plan = where / "plan.yaml"
    else:
        plan = lckv_plan(ratio) if row == "lckv" else down_plan(ratio, train_q=row == "down-q")
    init = "keep" if row.endswith("-keep") else "mean"
    convert(MODEL, out, overwrite=True, loaded=loaded, plan=plan, calib="none", kv_init=init)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="2,4")
    ap.add_argument("--rows", default="down,down-keep,profile,lckv,mla")
    ap.add_argument("--tokens", default="32768,131072", help="distillation budgets; '' for none")
    ap.add_argument("--distill-rows", default="down,down-keep,lckv,mla")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--reuse", action="store_true", help="reuse conversions (and their scores) of an earlier run")
    ap.add_argument("--out", default="runs/bench-condensed")
    a = ap.parse_args()
    from kvx.data import token_windows
    from kvx.distill import distill
    from kvx.loading import load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_model(MODEL)
    windows = {t: token_windows(base[1], t, "eval", a.eval_tokens, 512) for t in TEXTS}
    ids = windows["bundled"][:1, :PREFILL] if windows["bundled"].shape[1] >= PREFILL else windows["bundled"][:1]
    original = _measure(base[0], windows, ids)
    budgets = [int(t) for t in a.tokens.split(",") if t]
    rows = []
    for ratio in (int(r) for r in a.ratios.split(",")):
        for row in a.rows.split(","):
            conv = out / f"x{ratio}-{row}"
            record = conv / "bench-row.json"
            if a.reuse and record.exists():
                got = json.loads(record.read_text())
            else:
                t0 = time.perf_counter()
                _convert(row, ratio, conv, base)
                got = {"convert_s": time.perf_counter() - t0, **_measure(conv, windows, ids)}
                record.write_text(json.dumps(got))
            got.update(ratio=ratio, row=row, healed={})
            if budgets and row in a.distill_rows.split(","):
                healed = out / f"x{ratio}-{row}-healed"
                t0 = time.perf_counter()
                distill(
                    str(conv),
                    healed,
                    tokens=max(budgets),
                    eval_every=min(budgets) // 1024,
                    eval_tokens=a.eval_tokens,
                    eval_data=",".join(TEXTS),
                    overwrite=True,
                )
                got["distill_s"] = time.perf_counter() - t0
                for m in (json.loads(line) for line in (healed / "metrics.jsonl").read_text().splitlines()):
                    if m["tokens"] in budgets:
                        got["healed"][m["tokens"]] = {t: m[f"eval_ppl_{t}"] for t in TEXTS}
            rows.append(got)
            print(json.dumps(got), file=sys.stderr, flush=True)

    device = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(
        f"\nSmolLM2-135M-Instruct (bundled), float32, {device}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. "
        f"Perplexity on {a.eval_tokens} tokens per text, windows of 512: original bundled "
        f"{original['ppl']['bundled']:.2f}, wiki {original['ppl']['wiki']:.2f}. Speed: prefill of {ids.shape[1]} "
        f"tokens, then {DECODE} greedy decode steps, batch 1; original {original['prefill']:.0f} / "
        f"{original['decode']:.1f} tokens/s. Condensed rows are converted without calibration (mean init); "
        "MLA rows with kvx's default conversion.\n"
    )
    cols = [0] + budgets
    head = " | ".join(f"{t} @{c // 1024}k" for c in cols for t in TEXTS)
    print(f"| KV cut (measured) | plan | {head} | prefill tok/s | decode tok/s | convert (s) |")
    print("| --- | --- |" + " --- |" * (2 * len(cols) + 3))
    labels = {
        "down": "condensed, adjacent runs (down)",
        "down-keep": "the same, sources keep their own K/V",
        "down-q": "the same, readers' queries trained too",
        "profile": "condensed, profile's runs (down)",
        "lckv": "condensed, LCKV top + warm-up (up)",
        "mla": "MLA (kvx default)",
    }
    for r in rows:
        ppl = {0: r["ppl"], **{int(k): v for k, v in r["healed"].items()}}
        cells = [f"{ppl[c][t]:.2f}" if c in ppl else "not run" for c in cols for t in TEXTS]
        print(
            f"| {r['ratio']}x ({original['kv_bytes'] / r['kv_bytes']:.2f}x) | {labels[r['row']]} | "
            + " | ".join(cells)
            + f" | {r['prefill']:.0f} | {r['decode']:.1f} | {r['convert_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
