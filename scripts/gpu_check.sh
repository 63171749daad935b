#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in under 10 minutes on one (after scripts/install.sh, whose
# torch==2.13.0 is a CUDA build on a Linux GPU machine): the tests with a CUDA path, the decode
# benchmark in bfloat16, a short bf16 distillation against the bare training loop and, where vllm
# installs, the DeepSeek export served by vLLM against transformers. Without a GPU: skipped, exit 0.
# Every section runs even when one before it fails; the exit status says whether any failed.
#   KVX_GPU_OUT (runs/gpu-check)  KVX_GPU_RUNS (3: decode runs)  KVX_GPU_TOKENS (65536: distill budget)
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA device; nothing to check here (skipped)"
    exit 0
fi
out="${KVX_GPU_OUT:-runs/gpu-check}"
mkdir -p "$out"
python3 -c 'import torch, transformers; print("gpu_check on", torch.cuda.get_device_name(0), "torch", torch.__version__, "transformers", transformers.__version__)'
failed=()
section() {  # section NAME COMMAND...: run it, time it, remember a failure
    local name=$1 start=$SECONDS
    shift
    echo "== $name"
    "$@" || failed+=("$name")
    echo "== $name: $((SECONDS - start)) s"
}
section "tests with a CUDA path" python3 -m pytest -q -m gpu -p no:cacheprovider
section "decode: prefill/decode tokens/s and peak memory, bfloat16" \
    python3 benchmarks/decode.py --device cuda --dtype bfloat16 --runs "${KVX_GPU_RUNS:-3}" --out "$out/decode"
section "distill: 4x MLA, bf16, tokens/s against the bare student+teacher loop" \
    python3 benchmarks/distill.py --ratios 4 --tokens "${KVX_GPU_TOKENS:-65536}" --batch-size 16 --mixed-precision bf16 --out "$out/distill"
if python3 -c 'import vllm' 2>/dev/null; then
    section "vLLM: the DeepSeek export, greedy outputs against transformers" python3 scripts/vllm_check.py --out "$out/vllm"
else
    echo "== vLLM: vllm is not installed (pip install vllm): skipped"
fi
if ((${#failed[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: every section passed"
