"""The CUDA path: every spec's runtime on a GPU, in float32 (exact against its own CPU run) and in
bfloat16 (generate() works, the cache holds the plan's bytes at 2 bytes a float).

Skipped where torch sees no CUDA device; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.convert import convert
from kvx.data import token_windows
from kvx.measure.kv import checked_nbytes, layer_bytes_spec, new_cache
from kvx.modeling.kvx_common import cache_kwargs
from kvx.plan import Plan

from .specs import EXAMPLES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
SMALL = dict(calib_tokens=1024, calib_seq_len=128)


@pytest.fixture(scope="module")
def converted(tiny_dir_factory, tmp_path_factory):
    """The tiny llama converted to every spec example it accepts."""
    from transformers import AutoConfig

    from kvx.arch import get_adapter

    src = tiny_dir_factory("llama")
    adapter = get_adapter(AutoConfig.from_pretrained(src))
    out = {}
    for ex in EXAMPLES:
        if "llama" in ex.refused_by:
            continue
        path = tmp_path_factory.mktemp("gpu") / ex.id
        convert(str(src), path, plan=Plan([ex.make(adapter)] * adapter.n_layers), **SMALL)
        out[ex.id] = path
    return out


@pytest.mark.parametrize("example", [ex.id for ex in EXAMPLES if "llama" not in ex.refused_by])
def test_cuda_matches_cpu_and_generates_in_bf16(converted, tokenizer, example):
    path = converted[example]
    ids = token_windows(tokenizer, "bundled", "eval", 80, 40)
    cpu = kvx.load(str(path))
    gpu = kvx.load(str(path), device="cuda")
    with torch.no_grad():
        assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, atol=2e-3, rtol=0)
    half = kvx.load(str(path), dtype=torch.bfloat16, device="cuda")
    cache = new_cache(half)
    out = half.generate(
        ids[:1].cuda(), do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **cache_kwargs(half, cache)
    )
    assert out.shape[1] == 48
    n = 47  # the last generated token's K/V are not cached yet
    assert checked_nbytes(half, cache, n) == sum(layer_bytes_spec(half, n))
