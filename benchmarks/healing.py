"""Healing per CPU-minute: how each initialisation converts SmolLM2-135M at 4x and 8x KV cuts,
and how far a short distillation takes it, on the bundled text and on a text of another domain.

Rows: each initialisation (``--init pca``, kvx 0.1's default; ``output``; ``best`` of both
per layer; ``best`` + layer-wise fitting; the same on the converted layers' inputs, on text the
model writes itself, and on that text mixed with the bundled one). Columns:
perplexity on the bundled evaluation text (New Testament) and on ``wiki`` (Wikipedia
vital-article leads, never used for calibration or training) after 0 and each budget of
distillation tokens (one `kvx distill` run per row, evaluated as it passes each budget), and
the wall time of each stage. A second table: conversion peak RSS over the weights' size for
SmolLM2 and for random models of the same width at 8, 16 and 32 layers.

    python benchmarks/healing.py [--ratios 4,8] [--tokens 16384,65536,262144] [--rows all]
        [--distill-rows pca,fit-mix] [--out runs/bench-healing]
    python benchmarks/healing.py --rss-only   (bundled calibration, no fitting: the memory of the machinery)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SETTINGS = {4: (60, 36), 8: (30, 18)}  # ratio -> (kv_rank, rope_dims) on SmolLM2 (384 floats/layer)
SHARED = {4: (80, 16), 8: (40, 8)}  # the same cuts with one RoPE key shared by the 3 KV heads (`--layout shared`)
FIT = 100  # layer-wise fitting steps (one calibration window each)
BIBLE = {"calib": "bundled", "fit_steps": 0}  # kvx 0.1's calibration: the bundled text, no fitting
# kvx convert's default of 2026-12-01 (since 2026-12-04 it fits 300 steps with q_proj,o_proj: fit-mix-300-qo);
# a row that does not name fit_also fits the new weights alone (_converted pins it), as it did when first run
MIX = {"init": "best", "fit_steps": FIT, "calib": "teacher+bundled"}
ROWS = {  # id -> (label, kvx convert options)
    "pca": ("pca (kvx 0.1 default)", {**BIBLE, "init": "pca"}),
    "output": ("output-aware", {**BIBLE, "init": "output"}),
    "best": ("best of both, per layer", {**BIBLE, "init": "best"}),
    "fit": ("best + layer-wise fitting", {**BIBLE, "init": "best", "fit_steps": FIT}),
    "fit-conv": (
        "best + fitting, converted inputs",
        {**BIBLE, "init": "best", "fit_steps": FIT, "calib_inputs": "converted"},
    ),
    "fit-teacher": ("best + fitting, own text", {**MIX, "calib": "teacher"}),
    "fit-mix": (
        "best + fitting, own text + bundled (the default of 2026-12-01)",
        MIX,
    ),
    "fit-mix-qo": (
        "the default, queries and output fitted too",
        {**MIX, "fit_also": "q_proj,o_proj"},
    ),
    "fit-mix-300-qo": (
        "the default, 300 fitting steps, queries and output fitted too (kvx convert's default now)",
        {**MIX, "fit_steps": 3 * FIT, "fit_also": "q_proj,o_proj"},
    ),
    "fit-mix-high": (
        "the default, high-frequency RoPE pairs",
        {**MIX, "rope_select": "high"},
    ),
    "fit-mix-shared": (
        "the default, one shared RoPE key (high-frequency)",
        {**MIX, "layout": "shared"},
    ),
    "fit-mix-shared-uniform": (
        "the default, one shared RoPE key (uniform stride)",
        {**MIX, "layout": "shared", "rope_select": "uniform"},
    ),
    "fit-mix-300": (
        "the default, 300 fitting steps",
        {**MIX, "fit_steps": 3 * FIT},
    ),
    "fit-mix-shared-300": (
        "the default, one shared RoPE key, 300 fitting steps",
        {**MIX, "fit_steps": 3 * FIT, "layout": "shared"},
    ),
    "fit-mix-shared-300-q": (
        "the default, one shared RoPE key, 300 fitting steps, queries fitted too",
        {**MIX, "fit_steps": 3 * FIT, "layout": "shared", "fit_also": "q_proj"},
    ),
    "fit-mix-shared-300-qo": (
        "the default, one shared RoPE key, 300 fitting steps, queries and output fitted too",
        {**MIX, "fit_steps": 3 * FIT, "layout": "shared", "fit_also": "q_proj,o_proj"},
    ),
    # Uneven per-layer sizes from `kvx profile` (its plan replaces the uniform kv_rank/rope_dims), then the default.
    "plan-spectrum": (
        "profile plan, sized by spectra, + the default",
        {**MIX, "allocate": "spectrum"},
    ),
    "plan-output": (
        "profile plan, sized by output error, + the default",
        {**MIX, "allocate": "output"},
    ),
    "plan-loss": (
        "profile plan, sized by final KL, + the default",
        {**MIX, "allocate": "loss"},
    ),
}
TEXTS = ("bundled", "wiki")
BATCH, SEQ = 4, 256  # distillation batches: 1024 tokens per step
LR = 3e-4  # the distillation learning rate of the first rows (kvx distill defaults to 1e-4)
DISTILL = {"train": "converted", "also": "none"}  # what the first rows' distillation trained

# One `kvx convert` in a launcher that reports its child's peak RSS (see mla_quality.py for why a launcher).
LAUNCHER = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def _ppl(model, windows: dict) -> dict:
    """Perplexity of ``model`` (or the checkpoint at that path) on each text's windows."""
    from kvx.loading import load
    from kvx.measure.perplexity import perplexity

    model = load(model) if isinstance(model, (str, Path)) else model
    return {text: perplexity(model, w) for text, w in windows.items()}


def _converted(a, conv: Path, windows: dict, **options) -> dict:
    """Convert and measure, or with ``--reuse`` read what an earlier run of the same row measured."""
    from kvx.convert import convert

    record = conv / "bench-row.json"
    if a.reuse and record.exists():
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    if "allocate" in options:  # the profile's plan (counted in the conversion's time), at the row's RoPE size
        from kvx.profile import profile

        ratio = 384 / (options.pop("kv_rank") + options["rope_dims"])  # SmolLM2: 384 KV floats per layer
        where = conv.with_name(conv.name + "-profile")
        profile(
            "smollm2-135m",
            where,
            overwrite=True,
            target_kv_ratio=ratio,
            rope_dims=options.pop("rope_dims"),
            allocate=options.pop("allocate"),
        )
        options["plan"] = where / "plan.yaml"
    result = convert("smollm2-135m", conv, overwrite=True, **{"fit_also": "none", **options})
    row = {"convert_s": time.perf_counter() - t0, "ppl0": _ppl(conv, windows)}
    # each layer's relative attention-output error on the held-out window, initialised and fitted
    row["layer_errors"] = [[r.error_init, r.error_fitted] for r in result["layers"].values()]
    record.write_text(json.dumps(row))
    return row


def quality(a, out: Path) -> list[dict]:
    from kvx.data import token_windows
    from kvx.distill import distill
    from kvx.generate import generated_windows
    from kvx.loading import load_model, resolve

    base = load_model("smollm2-135m")
    windows = {t: token_windows(base[1], t, "eval", a.eval_tokens, 512) for t in TEXTS}
    original = _ppl(base[0], windows)
    budgets = [int(t) for t in a.tokens.split(",") if t] if a.tokens else []
    t0 = time.perf_counter()  # the model's own text, sampled once here unless cached (the rows reuse it)
    generated_windows(base[0], base[1], 16384, 512, cache_key=resolve("smollm2-135m")[0])
    sampled_s = time.perf_counter() - t0
    rows = []
    for ratio in (int(r) for r in a.ratios.split(",")):
        for key, (label, opts) in ROWS.items():
            if a.rows != "all" and key not in a.rows.split(","):
                continue
            rank, rope = (SHARED if opts.get("layout") == "shared" else SETTINGS)[ratio]
            name = f"x{ratio}-" + "-".join(f"{k}={v}" for k, v in opts.items())
            conv = out / name
            base_row = _converted(a, conv, windows, loaded=base, kv_rank=rank, rope_dims=rope, **opts)
            base_row.update(ratio=ratio, label=label, data="", ppl={0: base_row["ppl0"]})
            if not (budgets and key in a.distill_rows.split(",")):
                rows.append(base_row)
                print(json.dumps(base_row), file=sys.stderr, flush=True)
                continue
            # what differs from the first runs' distillation is named in the row's text and in its folder
            tweaks = {"lr": f"{a.distill_lr:g}"} if a.distill_lr != LR else {}
            tweaks |= {k: v for k, v in (("train", a.distill_train), ("also", a.distill_also)) if v != DISTILL[k]}
            tweaks |= {"seed": a.distill_seed} if a.distill_seed else {}  # a second run of a row: its noise
            for data in a.distill_data.split(","):
                row = {**base_row, "data": data + "".join(f", {k} {v}" for k, v in tweaks.items())}
                row["ppl"] = dict(base_row["ppl"])
                healed = out / (
                    f"{name}-healed" + f"-{data}" * (data != "bundled") + "".join(f"-{k}{v}" for k, v in tweaks.items())
                )
                t0 = time.perf_counter()
                distill(
                    str(conv),
                    healed,
                    data=data,
                    tokens=max(budgets),
                    seq_len=SEQ,
                    batch_size=BATCH,
                    lr=a.distill_lr,
                    train=a.distill_train,
                    train_also=a.distill_also,
                    seed=a.distill_seed,
                    eval_every=min(budgets) // (BATCH * SEQ),
                    eval_tokens=a.eval_tokens,
                    overwrite=True,
                    eval_data=",".join(TEXTS),
                )
                row["distill_s"] = time.perf_counter() - t0
                metrics = [json.loads(line) for line in (healed / "metrics.jsonl").read_text().splitlines()]
                for m in metrics:
                    if m["tokens"] in budgets:
                        row["ppl"][m["tokens"]] = {t: m[f"eval_ppl_{t}"] for t in TEXTS}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    device = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    print(
        f"\nSmolLM2-135M-Instruct (bundled), float32, {device}, torch {torch.__version__}. Perplexity: "
        f"{a.eval_tokens} tokens per text in windows of 512; original model bundled {original['bundled']:.2f}, "
        f"wiki {original['wiki']:.2f}."
    )
    print(
        "Conversion: 16384 calibration tokens (the bundled Old Testament unless the row says otherwise: 'own text' is "
        f"text the model writes itself, `--calib teacher`, sampled once in {sampled_s:.0f} s, 0 s if it was cached, "
        "and not counted in the rows), 2norm RoPE pairs per KV head (high-frequency ones for a shared key) "
        f"and layer-wise fitting {FIT} steps unless the row says otherwise. "
        "Distillation: `kvx distill`, "
        "KL from the original on the row's text (`--data`), converted weights only unless the row says otherwise, "
        f"lr {LR:g} unless the row says otherwise, batches of {BATCH} x {SEQ}, "
        "one run per distilled row evaluated as it passes each budget "
        "(so an earlier budget saw a learning rate scheduled for the largest).\n"
    )
    cols = [0] + budgets
    head = " | ".join(f"{t} @{c // 1024}k" if c else f"{t} @0" for c in cols for t in TEXTS)
    print(f"| KV cut | initialisation | distilled on | {head} | convert (s) | distill (s) |")
    print("| --- | --- | --- |" + " --- |" * (2 * len(cols) + 2))
    for r in rows:
        cells = [f"{r['ppl'][c][t]:.2f}" if c in r["ppl"] else "not run" for c in cols for t in TEXTS]
        print(
            f"| {r['ratio']}x | {r['label']} | {r['data'] or '-'} | "
            + " | ".join(cells)
            + f" | {r['convert_s']:.0f} | {r.get('distill_s', 0):.0f} |"
        )
    return rows


def _random_model(path: Path, layers: int) -> None:
    """A random model of SmolLM2-135M's width with ``layers`` layers, with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvx.loading import resolve

    src = resolve("smollm2-135m")[0]
    config = AutoConfig.from_pretrained(src)
    config.num_hidden_layers = layers
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)


def rss(out: Path) -> None:
    from kvx.loading import resolve

    models = {"SmolLM2-135M (30 layers)": resolve("smollm2-135m")[0]}
    for n in (8, 16, 32):
        path = out / f"random-{n}"
        if not (path / "config.json").exists():
            _random_model(path, n)
        models[f"random, SmolLM2 width, {n} layers"] = str(path)
    print("\n| model | weights (MiB) | convert wall (s) | peak RSS (MiB) | RSS / weights |")
    print("| --- | --- | --- | --- | --- |")
    for label, path in models.items():
        weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                sys.executable,
                "-m",
                "kvx.cli",
                "convert",
                path,
                "--kv-rank",
                "60",
                "--rope-dims",
                "36",
                "-o",
                str(out / "rss-out"),
                "--overwrite",
                # The layer-at-a-time machinery alone: the model's own text would load the whole model once to
                # sample it, and fitting adds time, not memory.
                *("--calib", "bundled", "--fit-steps", "0"),
            ],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        peak = int(proc.stdout.split()[-1]) / 1024
        print(f"| {label} | {weights:.0f} | {wall:.0f} | {peak:.0f} | {peak / weights:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--tokens", default="16384,65536,262144", help="distillation budgets; '' for none")
    ap.add_argument("--rows", default="all", help=f"'all' or some of {','.join(ROWS)}")
    ap.add_argument("--distill-rows", default="pca,fit-mix", help="the rows that are also distilled")
    ap.add_argument(
        "--distill-data", default="bundled", help="training text of the distilled rows, comma-separated: one run each"
    )
    ap.add_argument("--distill-lr", type=float, default=LR, help="the distillation's learning rate")
    ap.add_argument(
        "--distill-seed", type=int, default=0, help="the distillation's data order (another: run-to-run noise)"
    )
    ap.add_argument("--distill-train", default=DISTILL["train"], help="the distillation's --train")
    ap.add_argument("--distill-also", default=DISTILL["also"], help="the distillation's --train-also")
    ap.add_argument("--reuse", action="store_true", help="reuse conversions (and their scores) of an earlier run")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--rss-only", action="store_true")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS table")
    ap.add_argument("--out", default="runs/bench-healing")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.rss_only:
        quality(a, out)
    if not a.no_rss:
        rss(out)


if __name__ == "__main__":
    main()
