"""Shared-RoPE MLA and the DeepSeek-V3 export: exact where the maths says so, loadable without kvx."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, DynamicCache

import kvx
from kvx.convert import convert
from kvx.errors import KvxError
from kvx.export import export_checkpoint
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.modeling.kvx_common import cache_kwargs

from .conftest import tiny_model
from .helpers import assert_same_function
from .test_mla import SMALL, _ids

# Runtime behaviour: run again under the oldest transformers of the declared range (.ci/run).
pytestmark = pytest.mark.runtime


def _save_tiny(path, family, tokenizer, n_kv=None):
    model = tiny_model(family)
    if n_kv is not None:  # same weights drawn for fewer KV heads
        config = model.config
        config.num_key_value_heads = n_kv
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _prefill_and_decode(model, cache, ids, steps=4):
    """Logits of a prefill and of ``steps`` single-token decode steps through ``cache``."""
    with torch.no_grad():
        out = [model(ids[:, :-steps], **cache_kwargs(model, cache)).logits]
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_rope_key_is_lossless_with_one_kv_head(family, tmp_path, tokenizer):
    """With one KV head the shared key is that head's key: full rank, all pairs, exact."""
    base = _save_tiny(tmp_path / "src", family, tokenizer, n_kv=1)
    convert(str(tmp_path / "src"), tmp_path / "mla", kv_rank="full", rope_dims="all", layout="shared", **SMALL)
    conv = kvx.load(str(tmp_path / "mla"))
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert_close(conv(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    # the cache holds one RoPE key for all heads: kv_rank + head_dim floats per token and layer
    attn = conv.model.layers[0].self_attn
    cache = new_cache(conv)
    with torch.no_grad():
        conv(ids[:1], **cache_kwargs(conv, cache))
    layer = cache.layers[0]
    assert layer.values.shape[1] == 1 and layer.values.shape[-1] == attn.head_dim
    assert layer.keys.shape[-1] == attn.kv_rank


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("select", ["high", "uniform"])
def test_deepseek_export_matches_kvx_runtime(family, select, tmp_path, tokenizer):
    """The native DeepseekV3ForCausalLM (no remote code) computes what kvx's runtime computes,
    prefill and cached decoding, with GQA heads, biases (Qwen2) and a strided RoPE set."""
    _save_tiny(tmp_path / "src", family, tokenizer)
    out = tmp_path / "mla"
    result = convert(
        str(tmp_path / "src"), out, kv_rank=24, rope_dims=8, rope_select=select, export="deepseek", **SMALL
    )
    assert result["deepseek"] == str(tmp_path / "mla-deepseek")
    config = json.loads((tmp_path / "mla-deepseek" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["q_lora_rank"]) == (24, 8, None)
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] and config["rope_interleave"] is True
    assert not (tmp_path / "mla-deepseek" / "modeling_kvx.py").exists()

    conv = kvx.load(str(out))
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "mla-deepseek").eval()
    assert type(native).__name__ == "DeepseekV3ForCausalLM"
    ids = _ids(tokenizer, n=40)
    got = _prefill_and_decode(native, DynamicCache(config=native.config), ids)
    want = _prefill_and_decode(conv, new_cache(conv), ids)
    assert_close(got, want, atol=1e-4, rtol=0)
    # transformers' DeepSeek caches the latent + shared RoPE key: the same bytes as kvx's cache and plan
    probe = ids[:1]
    assert (
        kv_bytes_per_token(native, probe)
        == kv_bytes_per_token(conv, probe)
        == kv_bytes_per_token_spec(native, probe.shape[1])
    )


def test_deepseek_export_of_smollm2(smollm2_dir, tmp_path, tokenizer):
    """The real model: kvx checkpoint -> `kvx export --format deepseek` -> same logits."""
    out = tmp_path / "ds"
    convert(smollm2_dir, out, kv_rank=80, rope_dims=16, layout="deepseek", calib_tokens=512, calib_seq_len=128)
    path = export_checkpoint(str(out), "deepseek")
    native = AutoModelForCausalLM.from_pretrained(path).eval()
    conv = kvx.load(str(out))
    assert_same_function(native, conv, _ids(tokenizer, n=64, batch=1))
    with pytest.raises(KvxError, match="already exists"):
        export_checkpoint(str(out), "deepseek")


def test_deepseek_export_refusals(tiny_dir, tmp_path):
    src = str(tiny_dir("llama"))
    convert(src, tmp_path / "kvx", kv_rank=24, rope_dims=8, **SMALL)
    with pytest.raises(KvxError, match="deepseek layout"):
        export_checkpoint(str(tmp_path / "kvx"), "deepseek")
    with pytest.raises(KvxError, match="available: deepseek"):
        export_checkpoint(str(tmp_path / "kvx"), "onnx")
    with pytest.raises(KvxError, match="deepseek layout"):  # refused before any work: one layer stays full
        convert(src, tmp_path / "part", kv_rank=24, rope_dims=8, layers="0-1", export="deepseek", **SMALL)
    assert not (tmp_path / "part").exists()
    with pytest.raises(KvxError, match="shared RoPE key"):
        convert(src, tmp_path / "x", kv_rank=24, rope_dims=8, rope_select="2norm", layout="deepseek", **SMALL)
    with pytest.raises(KvxError, match="even size"):
        convert(src, tmp_path / "x", kv_rank=24, rope_dims=7, layout="deepseek", **SMALL)
    with pytest.raises(KvxError, match="keys per head"):
        convert(str(tiny_dir("qwen3")), tmp_path / "x", kv_rank=24, rope_dims=8, layout="deepseek", **SMALL)


def test_deepseek_export_refuses_rope_scaling(tmp_path, tokenizer):
    """Llama 3's frequency-dependent RoPE scaling has no DeepSeek equivalent: refused before any work."""
    model = tiny_model("llama")
    model.config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    model.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    with pytest.raises(KvxError, match="RoPE scaling 'llama3'"):
        convert(str(tmp_path / "src"), tmp_path / "x", kv_rank=24, rope_dims=8, export="deepseek", **SMALL)
    assert not (tmp_path / "x").exists()
    # kvx's own runtime takes any RoPE: the same conversion without the export works
    convert(str(tmp_path / "src"), tmp_path / "y", kv_rank=24, rope_dims=8, layout="shared", **SMALL)
