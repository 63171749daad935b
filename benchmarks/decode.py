"""Serving speed and memory of SmolLM2-135M and its conversions: prefill and decode tokens/s and
peak memory of ``generate()``, at each context and batch size, and the largest batch whose cache
fits a memory budget.

Models: the original; MLA 4x (the README's first command; absorbed decoding; ``mla-expanded``: the
same checkpoint decoding by decompressing K/V from the latent each step); streaming on every
layer (4 sinks + a 1020-token window); a hybrid (even layers streaming with a 252-token window,
odd layers MLA 4x); condensed 2x (each pair of layers reads its first's K/V). Quality is not
measured here (the speed-only conversions calibrate on 2k tokens); see the other benchmarks.

Timing comes from inside one ``generate()`` call: a logits processor stamps the clock at each
step, so the prefill is the time to the first step and decode the rate over the steps after
it (CUDA: synchronised), after one warm-up run that is not counted. Median of ``--runs``
runs, the models interleaved within each run. Memory: CUDA, the peak allocated during the call above what was allocated
before it; CPU, the peak resident set above the one before the call, sampled every 2 ms. The
cache bytes are measured from the cache object after the call and checked against the plan.

    python benchmarks/decode.py [--contexts 1024,4096,8192] [--batches 1,4,16] [--new-tokens 32]
        [--runs 3] [--models original,mla,mla-expanded,streaming,hybrid,condensed] [--budget-gib 16]
        [--device cuda --dtype bfloat16] [--out runs/bench-decode]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
N_LAYERS = 30
SPEED_CALIB = {"calib_tokens": 2048, "calib_seq_len": 512}


def _plans() -> dict:
    from kvx.plan import CondensedSpec, MLASpec, Plan, StreamingSpec

    mla = MLASpec(60, 36)
    return {
        "mla": Plan([mla] * N_LAYERS),
        "streaming": Plan([StreamingSpec(4, 1020)] * N_LAYERS),
        "hybrid": Plan([StreamingSpec(4, 252) if i % 2 == 0 else mla for i in range(N_LAYERS)]),
        "condensed": Plan([CondensedSpec(i - i % 2) for i in range(N_LAYERS)]),
    }


def _checkpoints(names: list[str], out: Path) -> dict[str, str]:
    from kvx.convert import convert

    paths = {}
    for name in names:
        if name == "original":
            paths[name] = MODEL
            continue
        base = name.removesuffix("-expanded")  # the same checkpoint, decoding another way
        path = out / base
        if not (path / "config.json").exists():
            convert(MODEL, path, plan=_plans()[base], overwrite=True, **SPEED_CALIB)
        paths[name] = str(path)
    return paths


class _Clock:
    """A logits processor that only reads the clock: one stamp per generation step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


class _PeakRSS:
    """Peak resident set size of this process while the block runs (CPU), sampled from /proc."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def _generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """One greedy ``generate()``: prefill seconds, decode tokens/s, peak extra memory, cache bytes."""
    from transformers import LogitsProcessorList

    from kvx.measure.kv import checked_nbytes, new_cache
    from kvx.modeling.kvx_common import cache_kwargs

    clock, cache = _Clock(ids.device), new_cache(model)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    kwargs.update(logits_processor=LogitsProcessorList([clock]), **cache_kwargs(model, cache))
    mask = torch.ones_like(ids)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **kwargs)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with _PeakRSS() as rss, torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, **kwargs)
        peak = rss.peak - rss.base
    steps = clock.stamps
    batch, context = ids.shape
    return {
        "prefill_tok_s": batch * context / (steps[0] - t0),
        "decode_tok_s": batch * (len(steps) - 1) / (steps[-1] - steps[0]),
        "peak_mb": peak / 2**20,
        # the cache holds every token but the last one generated (its K/V are made by the next step)
        "cache_mb": checked_nbytes(model, cache, context + new_tokens - 1, batch) / 2**20,
    }


def _ids(tokenizer, batch: int, context: int, device) -> torch.Tensor:
    from kvx.data import token_windows

    return token_windows(tokenizer, "bundled", "eval", batch * context, context).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="original,mla,mla-expanded,streaming,hybrid,condensed")
    ap.add_argument("--budget-gib", type=float, default=16.0, help="memory budget for the cache (serving table)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="runs/bench-decode")
    args = ap.parse_args()

    from kvx.loading import load_model
    from kvx.measure.kv import kv_bytes_per_token_spec

    out, device, dtype = Path(args.out), torch.device(args.device), getattr(torch, args.dtype)
    contexts, batches = [int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")]
    names = args.models.split(",")
    models, tokenizer = {}, None
    for name, path in _checkpoints(names, out).items():
        models[name], tokenizer, _ = load_model(path, dtype=dtype, device=args.device)
        if name.endswith("-expanded"):
            for m in models[name].modules():
                if hasattr(m, "absorb"):
                    m.absorb = "never"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    machine = f"{where}, {os.cpu_count()} CPUs, {args.dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    print(f"# {machine}", flush=True)

    grid = [(c, b) for c in contexts for b in batches]
    runs: dict = {}
    for r in range(args.runs + 1):  # run 0 warms up (allocator, kernels, lazy init): not counted
        for context, batch in grid:
            ids = _ids(tokenizer, batch, context, device)
            for name, model in models.items():
                row = _generate(model, ids, args.new_tokens)
                if r == 0:
                    continue
                runs.setdefault((name, context, batch), []).append(row)
                print(f"run {r} {name} ctx {context} batch {batch}: {row}", flush=True)

    table = []
    print(f"\n## Decode (benchmarks/decode.py; {machine}; median of {args.runs} runs)\n")
    print("| model | context | batch | prefill tok/s | decode tok/s | decode vs original | peak MB | cache MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for context, batch in grid:
        for name in models:
            rows = runs[(name, context, batch)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            base = statistics.median(r["decode_tok_s"] for r in runs[(names[0], context, batch)])
            table.append({"model": name, "context": context, "batch": batch, **med})
            print(
                f"| {name} | {context} | {batch} | {med['prefill_tok_s']:.0f} | {med['decode_tok_s']:.1f} | "
                f"{med['decode_tok_s'] / base:.2f}x | {med['peak_mb']:.0f} | {med['cache_mb']:.1f} |"
            )
    budget = args.budget_gib * 2**30
    print(f"\n### Largest batch whose cache fits {args.budget_gib:g} GiB ({args.dtype})\n")
    print("| model | " + " | ".join(f"{c} tokens" for c in contexts) + " |")
    print("|" + " --- |" * (len(contexts) + 1))
    serving = {}
    for name, model in models.items():
        fits = [int(budget // (kv_bytes_per_token_spec(model, c) * c)) for c in contexts]
        serving[name] = dict(zip(contexts, fits))
        print(f"| {name} | " + " | ".join(str(f) for f in fits) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"machine": machine, "rows": table, "serving": serving}, indent=2))


if __name__ == "__main__":
    main()
