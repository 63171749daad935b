"""kvx distill: it heals, it resumes exactly, it runs under accelerate launch, it refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvx
from kvx.convert import convert
from kvx.data import token_windows
from kvx.distill import distill, kl_loss
from kvx.errors import KvxError

from .helpers import checkpoint_tensors

TRAIN = dict(seq_len=64, batch_size=4, lr=3e-3, data="bundled")  # no sampling: the default mix is in test_recipe


@pytest.fixture
def student(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank=4, rope_dims=4, rope_select="high", calib_tokens=1024, calib_seq_len=128)
    return src, out


def _kl(student_path, teacher_path, ids):
    s, t = kvx.load(str(student_path)), AutoModelForCausalLM.from_pretrained(teacher_path)
    with torch.no_grad():
        return kl_loss(s(ids).logits, t(ids).logits).item()


def test_a_few_steps_reduce_the_kd_loss_and_only_train_converted_weights(student, tmp_path, tokenizer):
    src, mla = student
    out = tmp_path / "healed"
    summary = distill(str(mla), out, tokens=64 * 4 * 12, **TRAIN)  # teacher: the source recorded in the plan
    trained_on = token_windows(tokenizer, "bundled", "calib", 64 * 4 * 12, 64)
    assert _kl(out, src, trained_on) < 0.95 * _kl(mla, src, trained_on)
    assert summary["steps"] == 12 and {"ppl_before", "ppl_after", "ppl_teacher"} <= set(summary)
    before, after = checkpoint_tensors(mla), checkpoint_tensors(out)
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == any(part in name for part in ("kv_a_proj", "kv_b_proj", "k_rope_proj")), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13)) and all(r["tokens_per_s"] > 0 for r in lines)
    assert "distillation" in kvx.load(str(out)).config.kvx and "before" in (out / "README.md").read_text()


def test_resume_continues_exactly(student, tmp_path):
    _, mla = student
    full = tmp_path / "full"
    distill(str(mla), full, tokens=64 * 4 * 8, save_every=4, **TRAIN)
    # An interrupted run: what existed after step 4, before the next checkpoint and the final save.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "checkpoints" / "step-4", cut / "checkpoints" / "step-4")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")  # step 5 was logged, then the kill
    distill(str(mla), cut, tokens=64 * 4 * 8, save_every=4, resume=True, **TRAIN)
    resumed = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(x) for x in lines]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    for a, b in zip(resumed[5:], original[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)  # the identical next batches
    a, b = checkpoint_tensors(full), checkpoint_tensors(cut)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_teacher_written_data_works_offline(student, tmp_path):
    src, mla = student
    summary = distill(str(mla), tmp_path / "t", teacher=str(src), tokens=64 * 4, **{**TRAIN, "data": "teacher"})
    assert summary["steps"] == 1 and (tmp_path / "t" / "config.json").exists()


def test_bad_inputs_are_clear_errors(student, tmp_path, smollm2_dir):
    src, mla = student
    with pytest.raises(KvxError, match="less than one optimizer step"):
        distill(str(mla), tmp_path / "a", tokens=100, **TRAIN)
    with pytest.raises(KvxError, match="data not found"):
        distill(str(mla), tmp_path / "b", tokens=1024, **{**TRAIN, "data": str(tmp_path / "missing.txt")})
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(other)
    changed = AutoTokenizer.from_pretrained(smollm2_dir)
    changed.add_tokens(["<kvx-extra-token>"])
    changed.save_pretrained(other)
    with pytest.raises(KvxError, match="another vocabulary"):
        distill(str(mla), tmp_path / "c", teacher=str(other), tokens=1024, **TRAIN)
    with pytest.raises(KvxError, match="--resume"):
        distill(str(mla), tmp_path / "d", tokens=1024, resume=True, **TRAIN)
    with pytest.raises(KvxError, match="nothing to train"):
        distill(str(src), tmp_path / "e", teacher=str(src), tokens=1024, **TRAIN)


def test_two_process_accelerate_launch_on_cpu(student, tmp_path):
    """Real DDP on CPU (gloo): accelerate's torchrun launcher with ACCELERATE_USE_CPU set.
    (`accelerate launch --cpu --num_processes 2` needs MPI, which CI does not have.)"""
    _, mla = student
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "kvx.cli",
            "distill",
            str(mla),
            "-o",
            str(out),
            "--tokens",
            str(64 * 4 * 2 * 2),
            "--seq-len",
            "64",
            "--batch-size",
            "4",
            "--save-every",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # 2 steps: the data was split in two
    assert kvx.load(str(out)).config.kvx["distillation"]["tokens"] == 64 * 4 * 2 * 2


def test_lora_trains_adapters_and_converted_weights_then_merges(student, tmp_path, tokenizer):
    src, mla = student
    out = tmp_path / "lora"
    distill(str(mla), out, tokens=64 * 4 * 12, train="lora", lora_rank=4, **TRAIN)
    before, after = checkpoint_tensors(mla), checkpoint_tensors(out)
    assert set(after) == set(before)  # merged: no adapter weights left in the checkpoint
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("kv_a_proj" in n for n in changed) and any("mlp.up_proj" in n for n in changed)
    assert not any("embed_tokens" in n or "norm" in n for n in changed)
    trained_on = token_windows(tokenizer, "bundled", "calib", 64 * 4 * 12, 64)
    assert _kl(out, src, trained_on) < 0.95 * _kl(mla, src, trained_on)


def test_train_also_adds_the_converted_layers_own_projections(tiny_dir, tmp_path):
    """``--train-also q_proj,o_proj`` trains the converted layer's query/output projections with its
    new weights; the layer that kept its KV keeps every weight; the plan records it; bad use refused."""
    src = tiny_dir("llama")
    mla = tmp_path / "mla"
    convert(str(src), mla, kv_rank=4, rope_dims=4, layers="1", calib_tokens=1024, calib_seq_len=128)
    out = tmp_path / "healed"
    distill(str(mla), out, tokens=64 * 4 * 2, train_also="q_proj,o_proj", **TRAIN)
    before, after = checkpoint_tensors(mla), checkpoint_tensors(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in changed if ".q_proj." in n or ".o_proj." in n} == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    }
    assert changed and all(n.startswith("model.layers.1.self_attn.") for n in changed)
    assert kvx.load(str(out)).config.kvx["distillation"]["train_also"] == ["q_proj", "o_proj"]
    with pytest.raises(KvxError, match="--train-also k_proj: choose from q_proj, o_proj"):
        distill(str(mla), tmp_path / "a", tokens=1024, train_also="k_proj", **TRAIN)
    with pytest.raises(KvxError, match="--train all trains them"):
        distill(str(mla), tmp_path / "b", tokens=1024, train="all", train_also="q_proj", **TRAIN)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_distill_trains_the_mapped_layers_and_the_reference_only_where_asked(tiny_dir, tmp_path):
    """``kvx distill`` on a model mapped onto another (random) model: only the mapped layers' V/O
    change, and the reference inside the checkpoint only where a layer asks ``train_source`` (the
    Q/K projections of the reference layer it reads); its cache is still counted. (Whether it heals
    is a real model's question: random tiny models' attention hardly matters.)"""
    from kvx.measure.kv import kv_bytes_per_token, kv_bytes_per_token_spec
    from kvx.plan import FullSpec, MappedSpec, Plan

    from .conftest import TINY_CONFIGS

    src = tiny_dir("llama")
    other = tmp_path / "other"  # the reference: another model of the same family and tokenizer
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((src / name).read_bytes())
    plan = Plan([FullSpec(), MappedSpec(1, train_source=True), MappedSpec(0)])
    mapped = convert(str(src), tmp_path / "mapped", plan=plan, reference=str(other), calib="none")["out"]
    healed = tmp_path / "healed"
    distill(str(mapped), healed, tokens=64 * 4 * 8, seq_len=64, batch_size=4, lr=3e-3, data="bundled")
    before, after = checkpoint_tensors(Path(mapped)), checkpoint_tensors(healed)
    changed = {n for n, t in before.items() if not torch.equal(t, after[n])}
    mine = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (1, 2) for m in "vo"}
    assert changed == mine | {f"kvx_reference.layers.1.self_attn.{m}_proj.weight" for m in "qk"}
    model, ids = kvx.load(str(healed)), torch.arange(5, 45)[None]
    assert kv_bytes_per_token(model, ids) == kv_bytes_per_token_spec(model, ids.shape[1])
