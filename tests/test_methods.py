"""Every method's invariants, over every example spec (tests/specs.py) x every family.

Each spec goes on every layer of a tiny random model. Then: the spec round-trips through its
text and YAML forms; conversion either works or is refused before anything is written; the
checkpoint loads with kvx and without it (same logits, same cache bytes); measured cache bytes
equal the plan's; token-by-token decoding equals the prefill; ``generate`` equals greedy
decoding without a cache, and so does beam search; the cache's batch operations move every
sequence's state; one distillation step changes exactly what the method declares trainable;
and every export either reproduces the model or refuses before writing.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import kvx
from kvx.arch import get_adapter
from kvx.convert import convert
from kvx.distill.loop import converted_parameter_names, select_trainable
from kvx.distill.losses import kl_loss
from kvx.errors import KvxError
from kvx.export import EXPORTS
from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec, new_cache
from kvx.methods import METHODS, method_of
from kvx.modeling.kvx_common import cache_kwargs
from kvx.plan import Plan, parse_spec, spec_string

from .conftest import FAMILIES, tiny_model
from .helpers import assert_batch_ops_follow_each_sequence, reload_many_without_kvx
from .specs import EXAMPLES

pytestmark = pytest.mark.runtime

CASES = [(e, f) for e in EXAMPLES for f in FAMILIES]
WORKING = [(e, f) for e, f in CASES if f not in e.refused_by]
REFUSED = [(e, f) for e, f in CASES if f in e.refused_by]
IDS = torch.arange(5, 45)[None]  # 40 tokens: past every streaming cap and gemma3's local window (16)


def _case_id(case) -> str:
    return f"{case[0].id}-{case[1]}"


def test_every_registered_method_has_examples():
    assert {e.make(get_adapter(tiny_model("llama").config)).kind for e in EXAMPLES} == set(METHODS)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_dir_factory):
    """Every case converted once: (source folder, checkpoint or None, refusal message or None)."""
    root = tmp_path_factory.mktemp("matrix")
    sources = {f: tiny_dir_factory(f) for f in FAMILIES}
    done = {}
    for example, family in CASES:
        adapter = get_adapter(tiny_model(family).config)
        plan = Plan(example.layers(adapter))
        out = root / f"{example.id}-{family}"
        try:
            convert(str(sources[family]), out, plan=plan, calib_tokens=512, calib_seq_len=128)
            done[(example.id, family)] = (sources[family], out, None)
        except KvxError as e:
            assert not out.exists(), "a refused conversion wrote its output"
            done[(example.id, family)] = (sources[family], None, str(e))
    return done


@pytest.fixture(scope="module")
def reloaded(matrix):
    """What each converted checkpoint computes in a fresh interpreter without kvx (one process for all)."""
    paths = [out for _, out, _ in matrix.values() if out is not None]
    return reload_many_without_kvx(paths, IDS)


def _converted(matrix, example, family):
    src, out, refused = matrix[(example.id, family)]
    assert refused is None, refused
    return src, out


@pytest.mark.parametrize("case", REFUSED, ids=_case_id)
def test_impossible_specs_are_refused_before_any_work(case, matrix):
    example, family = case
    src, out, refused = matrix[(example.id, family)]
    assert out is None and refused, f"{example.id} should be refused on {family}"
    assert "\n" not in refused  # one line for the user


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_spec_round_trips_through_text_and_yaml(case):
    example, family = case
    adapter = get_adapter(tiny_model(family).config)
    spec = example.make(adapter)
    kind, args = parse_spec(spec_string(spec))
    assert METHODS[kind].make_spec(args, adapter, calibrated=True) == spec
    plan = Plan(example.layers(adapter), "m", {"note": 1})
    assert Plan.from_yaml(plan.to_yaml()) == plan


@pytest.mark.parametrize("case", WORKING, ids=_case_id)
def test_converted_checkpoint_invariants(case, matrix, reloaded):
    example, family = case
    _, out = _converted(matrix, example, family)
    model = kvx.load(str(out))
    plan = Plan.from_config(model.config)
    assert plan.layers == example.layers(get_adapter(model.config))
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits

    # measured cache bytes == the plan's (checked layer by layer inside kv_bytes_per_token)
    assert kv_bytes_per_token(model, IDS) == kv_bytes_per_token_spec(model, IDS.shape[-1])

    # loads without kvx: same logits, same cache bytes
    got = reloaded[out]
    assert got["kvx_imported"] is False
    assert_close(got["logits"], full, atol=1e-5, rtol=0)
    assert sum(got["cache_bytes"]) == pytest.approx(kv_bytes_per_token(model, IDS) * IDS.shape[-1])

    # token-by-token decoding through the cache == one prefill
    cache = new_cache(model)
    with torch.no_grad():
        steps = [model(IDS[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(IDS.shape[-1])]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)

    # generate (with the model's own cache) == greedy decoding without a cache
    gen = model.generate(IDS[:, :12], max_new_tokens=5, do_sample=False)[0].tolist()
    seq = IDS[:, :12]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert gen == seq[0].tolist()

    # beam search through the cache == beam search recomputing every step without one
    beams = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert (
        model.generate(IDS[:, :12], **beams).tolist() == model.generate(IDS[:, :12], use_cache=False, **beams).tolist()
    )
    assert_batch_ops_follow_each_sequence(model, torch.stack([IDS[0, :20], IDS[0, 20:]]), IDS[0, :6].view(3, 2))


@pytest.mark.parametrize("case", WORKING, ids=_case_id)
def test_one_distill_step_trains_exactly_what_the_method_declares(case, matrix):
    example, family = case
    src, out = _converted(matrix, example, family)
    student, teacher = kvx.load(str(out)), kvx.load(str(src))
    plan, adapter = Plan.from_config(student.config), get_adapter(student.config)
    declared = set(converted_parameter_names(student, plan, adapter))
    if not any(method_of(s).trainable(s) for s in plan.layers):
        assert not declared
        with pytest.raises(KvxError, match="nothing to train"):
            select_trainable(student, "converted", plan, adapter)
        return
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    params = select_trainable(student, "converted", plan, adapter)
    opt = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad():
        target = teacher(IDS).logits
    student.train()
    kl_loss(student(IDS, use_cache=False).logits, target).backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == declared


@pytest.mark.parametrize("case", WORKING, ids=_case_id)
def test_every_export_matches_or_refuses_before_writing(case, matrix, tmp_path):
    example, family = case
    src, out = _converted(matrix, example, family)
    model = kvx.load(str(out))
    plan, adapter = Plan.from_config(model.config), get_adapter(model.config)
    with torch.no_grad():
        want = model(IDS, use_cache=False).logits
    for name, exporter in EXPORTS.items():
        target = tmp_path / name
        try:
            exporter.check(plan, adapter)
        except KvxError:
            assert not target.exists()
            continue
        from transformers import AutoModelForCausalLM

        exporter.write(str(src), out, None, adapter, plan, target, overwrite=False)
        native = AutoModelForCausalLM.from_pretrained(target).eval()  # no remote code
        with torch.no_grad():
            assert_close(native(IDS).logits, want, atol=1e-4, rtol=0)


def test_every_export_is_exercised_by_some_example():
    """The export test above must reproduce each format at least once, not only see refusals."""
    for name, exporter in EXPORTS.items():
        ok = []
        for example, family in WORKING:
            adapter = get_adapter(tiny_model(family).config)
            try:
                exporter.check(Plan(example.layers(adapter)), adapter)
                ok.append((example.id, family))
            except KvxError:
                pass
        assert ok, f"no example spec exports to {name}"
