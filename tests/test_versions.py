"""The transformers range kvx declares: a checkpoint written here runs the same under both ends,
and a cache that holds nothing where the plan says it must is an error, never a number."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from torch.testing import assert_close

import kvx
from kvx.convert import convert
from kvx.errors import KvxError
from kvx.eval import evaluate_model
from kvx.hub import model_card
from kvx.loading import cache_root
from kvx.measure.kv import kv_bytes_per_token, new_cache
from kvx.modeling.kvx_common import cache_kwargs
from kvx.plan import FullSpec, MLASpec, Plan, StreamingSpec

from .helpers import declared_transformers_range, reload_without_kvx

pytestmark = pytest.mark.runtime

HYBRID = Plan([MLASpec(16, 8, "high"), StreamingSpec(2, 8), FullSpec()])


def test_installed_transformers_is_inside_the_declared_range():
    oldest, newest = declared_transformers_range()
    assert oldest < newest
    assert oldest <= Version(transformers.__version__) <= newest


def _transformers_at(version: Version) -> os.PathLike | None:
    """A folder holding only ``transformers==version`` (no deps: the rest of this environment
    already satisfies both ends), to put in front of ``PYTHONPATH``; None for the installed one."""
    if Version(transformers.__version__) == version:
        return None
    target = cache_root() / "transformers" / str(version)
    if not (target / "transformers" / "__init__.py").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, f"transformers=={version}"]
        proc = subprocess.run(pip, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            f"could not fetch transformers {version} from the package index: {proc.stderr[-1000:]}"
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, tokenizer, tiny_dir_factory):
    """An MLA + streaming + full checkpoint of a tiny Qwen2 (biases), written by this kvx."""
    src = tiny_dir_factory("qwen2")
    out = tmp_path_factory.mktemp("versions") / "hybrid"
    convert(str(src), out, plan=HYBRID, calib_tokens=1024, calib_seq_len=128)
    return out


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_checkpoint_written_here_runs_the_same_at_both_ends_of_the_range(end, hybrid, tokenizer):
    version = dict(zip(("oldest", "newest"), declared_transformers_range()))[end]
    ids = tokenizer("And it came to pass in those days, that there went out a decree", return_tensors="pt").input_ids
    local = kvx.load(str(hybrid))
    with torch.no_grad():
        want = local(ids).logits
    want_tokens = local.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()

    got = reload_without_kvx(hybrid, ids, _transformers_at(version))
    assert Version(got["transformers"]) == version and got["kvx_imported"] is False
    assert got["attention"] == ["MLAAttention", "StreamingAttention", "Qwen2Attention"]
    assert_close(got["logits"], want, atol=1e-5, rtol=0)
    assert got["tokens"] == want_tokens
    # every layer really caches (the failure mode of a renamed cache argument: MLA/streaming hold nothing)
    assert all(b > 0 for b in got["cache_bytes"])
    assert sum(got["cache_bytes"]) == pytest.approx(kv_bytes_per_token(local, ids) * ids.shape[-1])


def test_no_deprecation_warning_from_kvx_calls(hybrid, tokenizer):
    """Forward with a cache, decoding and generate through kvx's own helpers warn about nothing."""
    model = kvx.load(str(hybrid))
    ids = tokenizer("In the beginning", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            model(ids[:, -1:], **cache_kwargs(model, cache))
        model.generate(ids, max_new_tokens=3, do_sample=False)


def _forget_cache(attn):
    """Make one attention module ignore the cache it is given (what a renamed argument did)."""
    forward = attn.forward

    def without_cache(*args, **kwargs):
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        return forward(*args, **kwargs)

    attn.forward = without_cache


def test_a_layer_that_caches_nothing_is_reported_not_divided_by(hybrid, tokenizer):
    model = kvx.load(str(hybrid))
    _forget_cache(model.model.layers[1].self_attn)
    ids = torch.arange(40)[None]
    with pytest.raises(KvxError, match=r"layer 1 \(streaming\): the cache holds nothing after 40 tokens"):
        kv_bytes_per_token(model, ids)
    with pytest.raises(KvxError, match="layer 1 "):
        evaluate_model(model, tokenizer, "bundled", max_tokens=256, seq_len=128)


def test_model_card_refuses_an_empty_measurement():
    with pytest.raises(KvxError, match="measured 0 bytes/token"):
        model_card("base", HYBRID, {"baseline": 64.0, "measured": 0.0, "spec": 48.0, "tokens": 8, "dtype": "float32"})
