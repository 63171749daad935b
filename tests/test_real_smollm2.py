"""The bundled SmolLM2-135M-Instruct: lossless conversion, identical generation, loading without kvx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import kvx
from kvx.convert import convert
from kvx.data import token_windows
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec

from .helpers import assert_same_function, reload_without_kvx

pytestmark = [pytest.mark.real, pytest.mark.runtime]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("smol") / "mla-full"
    # Lossless at full rank whatever the calibration: the corpus alone, no fitting, keeps CI short.
    convert(
        "smollm2-135m",
        out,
        kv_rank="full",
        rope_dims="all",
        calib="bundled",
        fit_steps=0,
        calib_tokens=2048,
        calib_seq_len=256,
    )
    return out


def test_full_rank_conversion_is_lossless_and_generates_the_same(converted, smollm2_dir, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    conv = kvx.load(str(converted))
    ids = token_windows(tokenizer, "bundled", "eval", 256, 128)
    prompt = tokenizer("The kingdom of heaven is like", return_tensors="pt").input_ids
    a = base.generate(prompt, max_new_tokens=20, do_sample=False)
    b = conv.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)
    one = ids[:1]
    assert (
        kv_bytes_per_token(conv, one) == kv_bytes_per_token_spec(conv, one.shape[-1]) == kv_bytes_per_token(base, one)
    )
    assert_same_function(conv, base, ids)


def test_checkpoint_files_and_reload_without_kvx(converted, tokenizer):
    files = {p.name for p in Path(converted).iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "modeling_kvx.py",
        "README.md",
    } <= files
    assert "tokenizer.json" in files
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= files
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_kvx.KvxForCausalLM"
    assert len(config["kvx"]["layers"]) == 30 and config["kvx"]["layers"][0]["kind"] == "mla"
    assert "bytes/token" in (converted / "README.md").read_text()

    ids = tokenizer("In the beginning was the Word", return_tensors="pt").input_ids
    got = reload_without_kvx(converted, ids)
    assert got["kvx_imported"] is False
    assert set(got["attention"]) == {"MLAAttention"} and set(got["cache_layers"]) == {"MLACacheLayer"}
    local = kvx.load(str(converted))
    with torch.no_grad():
        logits = local(ids).logits
    assert_close(got["logits"], logits, atol=1e-4, rtol=0)
    assert got["tokens"] == local.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    assert sum(got["cache_bytes"]) == pytest.approx(kv_bytes_per_token(local, ids) * ids.shape[-1])
