"""vLLM serves kvx's DeepSeek export as transformers runs it: greedy continuations compared.

Converts SmolLM2-135M to MLA with the DeepSeek layout and exports it (``kvx convert --export
deepseek``), then generates greedily from the same prompts with vLLM and with transformers'
``DeepseekV3ForCausalLM`` (both bfloat16 on the GPU) and prints the tokens agreed before the
first divergence, per prompt. bfloat16 kernels differ, so late divergences are expected; an
early one on every prompt means vLLM reads the checkpoint differently.

    python scripts/vllm_check.py [--out runs/gpu-check/vllm] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "Photosynthesis is the process by which",
    "Here is a short story about a lighthouse keeper:",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check/vllm")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from kvx.convert import convert

    out = Path(args.out)
    export = out / "mla-deepseek-deepseek"  # convert --export writes OUT-deepseek beside OUT
    if not (export / "config.json").exists():
        options = dict(kv_rank=80, rope_dims=16, layout="deepseek", export="deepseek")
        convert("smollm2-135m", out / "mla-deepseek", overwrite=True, **options)
    tok = AutoTokenizer.from_pretrained(export)
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).cuda().eval()
    ref = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        gen = hf.generate(ids, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        ref.append(gen[0, ids.shape[1] :].tolist())
    del hf
    torch.cuda.empty_cache()
    llm = LLM(model=str(export), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    for p, a, b in zip(PROMPTS, ref, got):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"{same:3d}/{len(a)} tokens agree  {p!r}")
        print(f"    transformers: {tok.decode(a)!r}\n    vllm:         {tok.decode(b)!r}")


if __name__ == "__main__":
    main()
