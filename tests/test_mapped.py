"""``mapped`` (IAM): layers that borrow a reference model's (or an earlier layer's) attention.

The method's general invariants run in tests/test_methods.py (the same-model variant); here:
a reference model run in lockstep, whose cache is counted, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.convert import convert
from kvx.convert.assemble import convert_model
from kvx.errors import KvxError
from kvx.measure.kv import checked_nbytes, kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.modeling.kvx_common import cache_kwargs
from kvx.plan import FullSpec, MappedSpec, Plan

from .conftest import tiny_model
from .helpers import assert_batch_ops_follow_each_sequence, reload_without_kvx

pytestmark = pytest.mark.runtime
IDS = torch.arange(5, 45)[None]


def _mapped_plan(n: int, **kw) -> Plan:
    return Plan([FullSpec()] + [MappedSpec(i, "reference", **kw) for i in range(1, n)])


def _decode(model, ids, prompt: int = 1):
    """Logits of a prefill of ``prompt`` tokens, then one token at a time, through one cache."""
    cache = new_cache(model)
    with torch.no_grad():
        out = [model(ids[:, :prompt], **cache_kwargs(model, cache)).logits]
        out += [model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_identity_map_onto_a_copy_reproduces_the_model(family, tiny_dir, tmp_path):
    src = tiny_dir(family)
    base = tiny_model(family)
    n = base.config.num_hidden_layers
    out = convert(str(src), tmp_path / "out", plan=_mapped_plan(n), reference=str(src), calib="none")
    assert out["kv"]["measured"] == out["kv"]["spec"]
    model = kvx.load(str(out["out"]))
    assert any(k.startswith("kvx_reference.") for k in model.state_dict())  # self-contained
    kept = {k for k in model.state_dict() if k.startswith("model.layers.") and ".self_attn.k_proj." in k}
    assert kept == {"model.layers.0.self_attn.k_proj.weight"} | (
        {"model.layers.0.self_attn.k_proj.bias"} if family == "qwen2" else set()
    )  # mapped layers keep no K projection
    with torch.no_grad():
        want = base(IDS).logits
        got = model(IDS).logits
    assert_close(got, want, atol=1e-5, rtol=0)
    steps, cache = _decode(model, IDS)
    assert_close(steps, want, atol=1e-4, rtol=0)
    # measured bytes, the reference's cache included, == the plan's
    spec = kv_bytes_per_token_spec(model, IDS.shape[1]) * IDS.shape[1]
    assert checked_nbytes(model, cache, IDS.shape[1]) == spec
    hd, kv = base.config.head_dim, base.config.num_key_value_heads
    floats = 2 * kv * hd + (n - 1) * kv * hd + n * 2 * kv * hd  # layer 0: K+V; mapped: V; reference: K+V x n
    assert spec == 4 * IDS.shape[1] * floats
    gen = model.generate(IDS[:, :10], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, base.generate(IDS[:, :10], max_new_tokens=6, do_sample=False))


def test_reference_keeps_only_the_layers_needed_and_a_bigger_model_saves(tiny_dir, tmp_path):
    """A 6-layer model mapping its layers 2-5 onto layer 0 of a 3-layer reference: the reference
    runs one layer, so the net KV falls; the saving is stated, and measured bytes == spec."""
    from transformers import AutoModelForCausalLM

    from .conftest import TINY_CONFIGS

    torch.manual_seed(1)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = 6
    big = AutoModelForCausalLM.from_config(config).eval()
    big.save_pretrained(tmp_path / "big")
    src = tiny_dir("llama")
    (tmp_path / "big" / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "big" / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    plan = Plan([FullSpec(), FullSpec()] + [MappedSpec(0)] * 3 + [MappedSpec(0, heads=(3, 2, 1, 0))])
    out = convert(str(tmp_path / "big"), tmp_path / "out", plan=plan, reference=str(src), calib="none")
    model = kvx.load(out["out"])
    assert len(model.kvx_reference.layers) == 1
    assert out["plan"].meta["mapping"]["kv_change"] == pytest.approx(-1 / 6)  # 2x64 + 4x32 + 64 vs 6x64
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[1])
    steps, _ = _decode(model, IDS, prompt=7)
    with torch.no_grad():
        assert_close(steps, model(IDS).logits, atol=1e-4, rtol=0)


def test_self_mapping_in_memory_equals_decoding():
    base = tiny_model("qwen2")
    model, _ = convert_model(base, Plan([FullSpec(), MappedSpec(0, "self"), MappedSpec(0, "self", (1, 1, 0, 3))]))
    with torch.no_grad():
        full = model(IDS).logits
    assert_close(_decode(model, IDS)[0], full, atol=1e-4, rtol=0)


def test_dynamic_map_is_chosen_at_prefill_and_kept_while_decoding():
    """A dynamic map picks each head's source at prefill; decoding after it == a static model
    with the chosen map prefilled over the whole sequence."""
    base = tiny_model("llama")
    dyn, _ = convert_model(base, Plan([FullSpec(), FullSpec(), MappedSpec(1, "self", dynamic=True, observe=8)]))
    steps, cache = _decode(dyn, IDS, prompt=20)
    chosen = cache.layers[2].head_map
    assert chosen.shape == (1, base.config.num_attention_heads)
    static, _ = convert_model(base, Plan([FullSpec(), FullSpec(), MappedSpec(1, "self", tuple(chosen[0].tolist()))]))
    with torch.no_grad():
        assert_close(steps, static(IDS).logits, atol=1e-4, rtol=0)


def test_beam_search_reorders_the_reference_cache_and_the_chosen_maps(tiny_dir, tmp_path):
    """The reference model's cache (attached to the model's own) and a dynamic map chosen per
    sequence move with their sequence when beam search reorders the batch."""
    src = tiny_dir("llama")
    n = tiny_model("llama").config.num_hidden_layers
    plans = {"static": _mapped_plan(n, heads=(3, 1, 2, 0)), "dynamic": _mapped_plan(n, dynamic=True, observe=8)}
    models = {
        name: kvx.load(str(convert(str(src), tmp_path / name, plan=plan, reference=str(src), calib="none")["out"]))
        for name, plan in plans.items()
    }
    for model in models.values():
        assert_batch_ops_follow_each_sequence(model, torch.stack([IDS[0, :20], IDS[0, 20:]]), IDS[0, :6].view(3, 2))
    # beam search with the caches == without (static map: a dynamic one is chosen afresh at each uncached step)
    beams = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    static = models["static"]
    assert (
        static.generate(IDS[:, :12], **beams).tolist()
        == static.generate(IDS[:, :12], use_cache=False, **beams).tolist()
    )


def test_refusals_before_any_work(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "out"
    n = 3

    def refused(plan, match, **kw):
        with pytest.raises(KvxError, match=match) as e:
            convert(str(src), out, plan=plan, calib="none", **kw)
        assert "\n" not in str(e.value) and not out.exists()

    refused(Plan([MappedSpec(0, "reference")] + [FullSpec()] * (n - 1)), "layer 0 cannot be mapped", reference=str(src))
    refused(_mapped_plan(n), "need the reference model")
    refused(Plan([FullSpec(), MappedSpec(7)] + [FullSpec()]), "reference layer 7 does not exist", reference=str(src))
    refused(Plan([FullSpec(), MappedSpec(2, "self"), FullSpec()]), "needs a source layer below it")
    refused(Plan([FullSpec(), MappedSpec(0, heads=(0, 1))] + [FullSpec()]), "names 2 heads", reference=str(src))
    refused(Plan([FullSpec(), MappedSpec(0, heads=(0, 1, 2, 9))] + [FullSpec()]), r"heads \[9\]", reference=str(src))
    other = tmp_path / "other"  # another vocabulary
    from transformers import AutoModelForCausalLM

    from .conftest import TINY_CONFIGS

    config = TINY_CONFIGS["llama"]()
    config.vocab_size = 1000
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    refused(_mapped_plan(n), "vocabulary", reference=str(other))
    qwen = tiny_dir("qwen2")  # another family
    refused(_mapped_plan(n), "is a qwen2 model", reference=str(qwen))


def test_profile_suggests_a_mapped_plan_that_convert_applies(tiny_dir, tmp_path):
    """``kvx profile --reference R --mapped 0.34`` on a model and a copy of itself: IAM's order picks
    the last layer; the measured map is the identity; ``kvx convert --plan`` then reproduces the model."""
    from kvx.profile import profile

    src = tiny_dir("llama")
    report = profile(str(src), tmp_path / "prof", reference=str(src), mapped=0.34, tokens=512, seq_len=128,
                     xscale_tokens=64)  # fmt: skip
    plan = Plan.from_dict(report["suggested_plan"])
    assert [s.kind for s in plan.layers] == ["full", "full", "mapped"]
    assert plan.layers[2].source == 2 and plan.layers[2].heads == (0, 1, 2, 3)
    assert report["mapping"]["kv_change"] > 0  # a copy as reference costs more than it saves: said so
    out = convert(str(src), tmp_path / "out", plan=Plan.load(tmp_path / "prof" / "plan.yaml"), calib="none")
    with torch.no_grad():
        assert_close(kvx.load(out["out"])(IDS).logits, tiny_model("llama")(IDS).logits, atol=1e-5, rtol=0)


def test_a_reference_compressed_by_kvx_serves_and_its_smaller_cache_counts(tiny_dir, tmp_path):
    """The reference may be a kvx checkpoint: its unreferenced layer 0 as MLA. At full rank the
    mapped model is still the original; at a low rank the reference's cache, and so the plan's
    bytes, shrink, measured == spec, and decoding == prefill."""
    src = tiny_dir("llama")
    base = tiny_model("llama")
    n = base.config.num_hidden_layers
    with torch.no_grad():
        want = base(IDS).logits
    sizes = {}
    for rank in ("full", 8):
        ref = tmp_path / f"ref-{rank}"
        convert(str(src), ref, kv_rank=rank, rope_dims="all" if rank == "full" else 4, layers="0", calib="none")
        out = convert(str(src), tmp_path / f"out-{rank}", plan=_mapped_plan(n), reference=str(ref), calib="none")
        assert out["kv"]["measured"] == out["kv"]["spec"]
        model = kvx.load(str(out["out"]))
        assert type(model.kvx_reference.layers[0].self_attn).__name__ == "MLAAttention"
        steps, cache = _decode(model, IDS)
        with torch.no_grad():
            got = model(IDS).logits
        assert_close(steps, got, atol=1e-4, rtol=0)
        if rank == "full":
            assert_close(got, want, atol=1e-4, rtol=0)
        else:  # the checkpoint alone, as a user without kvx loads it: the reference comes inside it
            seen = reload_without_kvx(out["out"], IDS)
            assert seen["kvx_imported"] is False
            assert_close(seen["logits"], got, atol=1e-5, rtol=0)
        sizes[rank] = checked_nbytes(model, cache, IDS.shape[1])
        assert sizes[rank] == kv_bytes_per_token_spec(model, IDS.shape[1]) * IDS.shape[1]
    assert sizes[8] < sizes["full"]


def test_a_same_model_plan_borrows_only_from_earlier_layers_that_keep_their_attention():
    """``suggest_mapped(model="self")`` on 6 layers at 50%: IAM's order maps 5, 4, 3; layer 5 is most
    like layer 4, but 4 is mapped, so it takes its best remaining match, layer 1, head by head."""
    from kvx.profile.suggest import suggest_mapped

    heads = torch.zeros(6, 2, 6, 2)
    for i in range(6):
        heads[i, :, i] = torch.eye(2)  # each layer is itself
    heads[5, :, 4], heads[5, :, 1] = 0.9, torch.tensor([[0.2, 0.8], [0.8, 0.2]])  # 1: heads swapped
    heads[4, :, 2] = heads[3, :, 0] = torch.eye(2) * 0.5
    plan = suggest_mapped(heads, 0.5, "iam", model="self")
    assert [s.kind for s in plan.layers] == ["full"] * 3 + ["mapped"] * 3
    assert [(s.source, s.model, s.heads) for s in plan.layers[3:]] == [(0, "self", (0, 1)), (2, "self", (0, 1)),
                                                                       (1, "self", (1, 0))]  # fmt: skip
