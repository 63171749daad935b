"""Layer-condensed KV (``condensed``): what the every-spec matrix (test_methods.py) cannot show.

Plans that differ by layer: every layer its own source (the original model, exactly), LCKV
with a warm-up layer, gemma3's local layers reading a local layer; the iterative prefill
converging to token-by-token decoding; decoding continuing a prefilled cache; the readers'
mean as the source's initialisation; bad plans refused before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.arch import get_adapter
from kvx.convert import convert
from kvx.convert.assemble import convert_model
from kvx.errors import KvxError
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.modeling.kvx_common import cache_kwargs, cache_nbytes
from kvx.plan import CondensedSpec, FullSpec, MLASpec, Plan, StreamingSpec

from .conftest import FAMILIES, tiny_model
from .helpers import assert_one_line_error, reload_without_kvx
from .helpers import kvx as run_kvx

pytestmark = pytest.mark.runtime

IDS = torch.arange(5, 45)[None]  # 40 tokens, past gemma3's local window (16)
C = CondensedSpec


def _token_by_token(model, ids, cache=None):
    cache = cache if cache is not None else new_cache(model)
    with torch.no_grad():
        return torch.cat(
            [model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(ids.shape[1])], dim=1
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_its_own_source_is_the_original_model(family):
    base = tiny_model(family)
    model, _ = convert_model(base, Plan([C(i) for i in range(base.config.num_hidden_layers)]))
    with torch.no_grad():
        assert_close(model(IDS, use_cache=False).logits, base(IDS).logits, atol=0, rtol=0)
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])


def test_iterative_prefill_converges_to_token_by_token_decoding():
    base = tiny_model("llama")
    exact = _token_by_token(convert_model(base, Plan([C(2)] * 3))[0], IDS)
    errors = []
    for passes in (1, 4, 8, 16, 40):
        model, _ = convert_model(base, Plan([C(2, passes=passes, grad_passes=0)] * 3))
        with torch.no_grad():
            errors.append(float((model(IDS, use_cache=False).logits - exact).abs().max()))
    assert all(b <= a * 1.01 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-4, errors  # one pass is far; as many passes as tokens is exact


def test_decoding_continues_a_prefilled_cache():
    """Whatever a prefill left in the cache (here a rough 3-pass one), decoding token by token
    from it equals prefilling the continuation as one exact chunk on top of it; an exact prefill
    followed by decoding equals token-by-token decoding from the start."""
    base = tiny_model("qwen3")

    def lckv(passes):
        return convert_model(base, Plan([FullSpec()] + [C(2, passes=passes, grad_passes=0)] * 2))[0]

    rough, exact = lckv(3), lckv(40)
    prompt, rest = IDS[:, :25], IDS[:, 25:]
    decoded_cache, chunk_cache = new_cache(rough), new_cache(rough)
    with torch.no_grad():
        rough(prompt, **cache_kwargs(rough, decoded_cache))
        rough(prompt, **cache_kwargs(rough, chunk_cache))
        assert decoded_cache.get_seq_length() == prompt.shape[1]
        assert cache_nbytes(decoded_cache) == kv_bytes_per_token_spec(rough, 25) * 25
        decoded = _token_by_token(rough, rest, decoded_cache)
        chunk = exact(rest, **cache_kwargs(exact, chunk_cache)).logits
    assert_close(decoded, chunk, atol=1e-4, rtol=0)

    from_start = _token_by_token(exact, IDS)[:, 25:]
    assert float((decoded - from_start).abs().max()) > 1e-3  # the rough prefill did leave different K/V
    cache = new_cache(exact)
    with torch.no_grad():
        exact(prompt, **cache_kwargs(exact, cache))
    assert_close(_token_by_token(exact, rest, cache), from_start, atol=1e-4, rtol=0)


def test_lckv_with_a_warm_up_layer_caches_two_layers_and_generates():
    base = tiny_model("llama")
    model, _ = convert_model(base, Plan([FullSpec(), C(2, passes=40), C(2, passes=40)]))
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])
    assert kv_bytes_per_token_spec(model, 40) == 2 / 3 * kv_bytes_per_token_spec(base_plan_model(base), 40)
    gen = model.generate(IDS[:, :12], max_new_tokens=6, do_sample=False)[0]
    seq = IDS[:, :12]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert gen.tolist() == seq[0].tolist()


def base_plan_model(base):
    return convert_model(base, Plan([FullSpec()] * base.config.num_hidden_layers))[0]


def test_gemma3_local_layer_reads_a_local_layer_below():
    base = tiny_model("gemma3")  # layers: local, global, local
    model, _ = convert_model(base, Plan([C(0), FullSpec(), C(0)]))
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits
    assert_close(_token_by_token(model, IDS), full, atol=1e-4, rtol=0)
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])
    assert kv_bytes_per_token_spec(model, 40) < kv_bytes_per_token_spec(base_plan_model(base), 40)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layers_above_an_mla_layer_share_its_latent(family, tmp_path):
    """Readers of an MLA source attend its cached latent through its up-projections: one latent
    for three layers, decoded (absorbed form) as prefilled (expanded form), and without kvx."""
    base = tiny_model(family)
    rope = 4 * base.config.num_key_value_heads  # two frequency pairs per KV head
    model, _ = convert_model(base, Plan([MLASpec(12, rope, "high"), C(0), C(0)]))
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits
    assert_close(_token_by_token(model, IDS), full, atol=1e-4, rtol=0)
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])
    only_mla = convert_model(base, Plan([MLASpec(12, rope, "high")] + [FullSpec()] * 2))[0]
    assert kv_bytes_per_token_spec(model, 40) < kv_bytes_per_token_spec(only_mla, 40) / 2
    model.save_pretrained(tmp_path / "ckpt")
    got = reload_without_kvx(tmp_path / "ckpt", IDS)
    assert_close(got["logits"], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["mean", "keep"])
def test_source_projections_are_the_readers_mean_or_its_own(init, tiny_dir, tmp_path):
    src = tiny_dir("qwen2")  # k/v biases: averaged too
    out = tmp_path / "out"
    convert(str(src), out, plan=Plan([FullSpec(), C(2), C(2)]), kv_init=init, calib="none")
    got, base = kvx.load(str(out)).state_dict(), tiny_model("qwen2").state_dict()
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        readers = [base[f"model.layers.{i}.self_attn.{name}"] for i in (1, 2)]
        want = torch.stack(readers).mean(0) if init == "mean" else readers[1]
        assert_close(got[f"model.layers.2.self_attn.{name}"], want)
        assert f"model.layers.1.self_attn.{name}" not in got  # the reader keeps no K/V projection
    assert_close(got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.parametrize(
    "family, layers, fragment",
    [
        ("llama", [C(5), FullSpec(), FullSpec()], "source 5 does not exist"),
        ("llama", [C(1), FullSpec(), FullSpec()], "layer 1 is full: make it condensed(source=1)"),
        ("llama", [C(1), C(2), C(2)], "which itself reads layer 2"),
        ("llama", [C(1), MLASpec(8, 8, "high"), FullSpec()], "an MLA layer above it"),
        ("llama", [StreamingSpec(2, 8), C(0), FullSpec()], "a streaming layer"),
        ("llama", [C(2, passes=3), C(2, passes=4), C(2)], "must share passes"),
        ("gemma3", [C(1), C(1), FullSpec()], "cannot read layer 1's K/V (global attention)"),
        ("gemma3", [C(2), FullSpec(), C(2)], "local-window layers can only read a layer below"),
    ],
)
def test_bad_plans_are_refused_before_any_work(family, layers, fragment, tiny_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KvxError) as e:
        convert(str(tiny_dir(family)), out, plan=Plan(layers), calib="none")
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    with pytest.raises(KvxError) as e:  # the in-memory conversion checks the plan the same way
        convert_model(tiny_model(family), Plan(layers))
    assert fragment in str(e.value)


def test_cli_converts_lckv_and_refuses_a_missing_source(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "lckv"
    refused = run_kvx("convert", str(src), "-o", str(tmp_path / "bad"), "--to", "condensed(source=2)", "--layers", "1")
    assert_one_line_error(refused, "layer 2 is full")
    assert_one_line_error(
        run_kvx("convert", str(src), "-o", str(tmp_path / "bad"), "--to", "condensed"), "needs its source"
    )
    assert not (tmp_path / "bad").exists()
    done = run_kvx(
        "convert", str(src), "-o", str(out), "--to", "condensed(source=2)", "--layers", "1-2", "--calib", "none"
    )
    assert done.returncode == 0, done.stderr
    model = kvx.load(str(out))
    assert [s.kind for s in Plan.from_config(model.config).layers] == ["full", "condensed", "condensed"]
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])
    assert get_adapter(model.config).n_layers == 3
