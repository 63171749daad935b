"""The checkpoint format: kvx's own model_type (never a silently wrong plain model), and
checkpoints written by kvx 0.1 (base model_type + a ``kvx`` entry) still load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

import kvx
from kvx.convert import convert
from kvx.plan import Plan

from .helpers import reload_without_kvx

pytestmark = pytest.mark.runtime

# Written by kvx 0.1 itself (commit 0159ee5): a tiny Llama (vocab 128) as a lossless hybrid,
# full-rank MLA + streaming (sink 2, window 8) + full, and the base model beside it.
FIXTURE = Path(__file__).parent / "fixtures" / "kvx-0.1"
IDS = torch.arange(3, 14)[None]  # 11 tokens: the streaming layer still sees everything


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_dir_factory):
    out = tmp_path_factory.mktemp("format") / "mla"
    convert(str(tiny_dir_factory("llama")), out, kv_rank=16, rope_dims=8, calib_tokens=1024, calib_seq_len=128)
    return out


def test_kvx_checkpoints_have_their_own_model_type(written):
    config = json.loads((written / "config.json").read_text())
    assert config["model_type"] == "kvx" and config["base_model_type"] == "llama"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_kvx.KvxConfig",
        "AutoModelForCausalLM": "modeling_kvx.KvxForCausalLM",
    }
    shipped = {p.name for p in written.glob("*.py")}
    assert {"modeling_kvx.py", "configuration_kvx.py", "kvx_specs.py", "kvx_common.py", "kvx_mla.py"} <= shipped


def test_loading_without_trust_remote_code_is_refused_by_transformers(written):
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(written)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(written)


def test_a_user_save_pretrained_writes_a_kvx_checkpoint(written, tmp_path):
    """``model.save_pretrained`` on a loaded kvx model (not through kvx) keeps the format and the runtime."""
    model = kvx.load(str(written))
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "kvx"
    again = reload_without_kvx(tmp_path / "again", IDS)
    with torch.no_grad():
        assert_close(again["logits"], model(IDS).logits, atol=1e-6, rtol=0)


def test_kvx_0_1_checkpoint_still_loads_and_upgrades(tmp_path):
    old = FIXTURE / "kvx-0.1-hybrid"
    config = json.loads((old / "config.json").read_text())
    assert config["model_type"] == "llama" and "kvx" in config  # the previous format, as written then
    base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base").eval()
    with torch.no_grad():
        want = base(IDS).logits
    model = kvx.load(str(old))
    assert [s.kind for s in Plan.from_config(model.config).layers] == ["mla", "streaming", "full"]
    with torch.no_grad():
        assert_close(model(IDS).logits, want, atol=1e-5, rtol=0)
    # its own shipped 0.1 runtime, through transformers (without a cache: 0.1's cache argument predates 5.24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # kvx 0.1's own call, inside the old checkpoint
        shipped = AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True).eval()
        with torch.no_grad():
            assert_close(shipped(IDS, use_cache=False).logits, want, atol=1e-5, rtol=0)
    # loading it with kvx and saving it again upgrades it to the current format and runtime
    model.save_pretrained(tmp_path / "upgraded")
    assert json.loads((tmp_path / "upgraded" / "config.json").read_text())["model_type"] == "kvx"
    got = reload_without_kvx(tmp_path / "upgraded", IDS)
    assert_close(got["logits"], want, atol=1e-5, rtol=0)
    assert all(b > 0 for b in got["cache_bytes"])
