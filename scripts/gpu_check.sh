#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in under 10 minutes on one (after scripts/install.sh, whose
# torch==2.13.0 is a CUDA build on a Linux GPU machine): the tests with a CUDA path, the decode
# benchmark in bfloat16, a short bf16 distillation against the bare training loop and, where vllm
# installs, the DeepSeek export served by vLLM against transformers. Without a GPU: skipped, exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA device; nothing to check here (skipped)"
    exit 0
fi
out="${KVX_GPU_OUT:-runs/gpu-check}"
mkdir -p "$out"
python3 -c 'import torch; print("gpu_check on", torch.cuda.get_device_name(0), "torch", torch.__version__)'
echo "== tests with a CUDA path"
python3 -m pytest -q -m gpu -p no:cacheprovider
echo "== decode: prefill/decode tokens/s and peak memory, bfloat16"
python3 benchmarks/decode.py --device cuda --dtype bfloat16 --runs 3 --out "$out/decode"
echo "== distill: 4x MLA, bf16, tokens/s against the bare student+teacher loop"
python3 benchmarks/distill.py --ratios 4 --tokens 65536 --batch-size 16 --mixed-precision bf16 --out "$out/distill"
echo "== vLLM: the DeepSeek export, greedy outputs against transformers"
if python3 -c 'import vllm' 2>/dev/null; then
    python3 scripts/vllm_check.py --out "$out/vllm"
else
    echo "vllm is not installed (pip install vllm): skipped"
fi
