"""The command line as a user meets it: bad input fails fast, in one line, and writes nothing."""

from __future__ import annotations

import json
import os

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from .helpers import assert_one_line_error, kvx


def test_help_lists_every_command():
    proc = kvx("--help")
    assert proc.returncode == 0
    for command in ("profile", "convert", "distill", "eval", "export", "push", "run"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no-such-recipe", "-o", "x"], "not found"),
        (["run", "smollm2-mla-4x"], "missing -o/--out"),
        (["push", "no-such-folder", "--repo", "me/x"], "not a checkpoint folder"),
        (["export", "no-such-folder"], "not found"),
    ],
)
def test_pipeline_commands_fail_in_one_line(args, message):
    assert_one_line_error(kvx(*args), message)


def test_run_list_shows_builtin_recipes():
    proc = kvx("run", "--list")
    assert proc.returncode == 0
    for name in ("smollm2-mla-4x", "smollm2-hybrid", "llama-3.2-1b-mla"):
        assert name in proc.stdout


def test_missing_model_path(tmp_path):
    out = tmp_path / "out"
    proc = kvx("convert", str(tmp_path / "no-such-model"), "--to", "mla", "-o", str(out))
    assert_one_line_error(proc, "not found")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kv-rank", "100000"], "--kv-rank 100000 is out of range"),
        (["--kv-rank", "0"], "out of range"),
        (["--rope-dims", "3"], "--rope-dims 3 must be a multiple of"),
        (["--rope-dims", "10000"], "exceeds all RoPE dims"),
        (["--rope-select", "sideways"], "unknown --rope-select"),
        (["--calib", "none", "--rope-select", "2norm"], "needs calibration data"),
        (["--layers", "7"], "outside 0..2"),
        (["--to", "lckv"], "not implemented yet"),
        (["--fit-also", "q_proj,k_proj"], "--fit-also k_proj: choose from q_proj, o_proj"),
    ],
)
def test_impossible_options(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_one_line_error(kvx("convert", str(tiny_dir("llama")), "-o", str(out), *args), fragment)
    assert not out.exists()


def test_unsupported_family(tmp_path):
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(src)
    out = tmp_path / "out"
    assert_one_line_error(kvx("convert", str(src), "-o", str(out)), "'gpt2' is not supported", "llama")
    assert not out.exists()


def test_failure_mid_run_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    proc = kvx("convert", str(tiny_dir("llama")), "-o", str(out), "--calib", str(tmp_path / "missing.txt"))
    assert_one_line_error(proc, "data not found")
    assert set(os.listdir(tmp_path)) - before == {"tiny-llama"}


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(kvx("convert", str(tiny_dir("llama")), "-o", str(out)), "already exists")


def test_hub_id_offline_names_the_switch(tmp_path):
    proc = kvx("eval", "someone/some-model", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "HF_HUB_OFFLINE")


def test_convert_then_eval_json(tiny_dir, tmp_path):
    src, out = tiny_dir("qwen2"), tmp_path / "out"
    proc = kvx("convert", str(src), "-o", str(out), "--kv-rank", "16", "--rope-dims", "8", "--calib-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "Writing model shards" not in proc.stderr  # kvx draws its own progress
    proc = kvx("eval", str(out), "--baseline", str(src), "--max-tokens", "512", "--seq-len", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"model", "baseline", "kv_ratio", "ppl_ratio", "agreement"}
    for row in (result["model"], result["baseline"]):
        assert row["kv_bytes_per_token"] == row["kv_bytes_per_token_spec"]
        assert row["ppl"] > 1
    # qwen2 tiny: 2 KV heads x 16 dims x (K and V) = 64 floats; MLA: 16 latent + 8 RoPE = 24 floats
    assert result["kv_ratio"] == pytest.approx(64 / 24)
    assert result["ppl_ratio"] == pytest.approx(result["model"]["ppl"] / result["baseline"]["ppl"])


def test_profile_then_convert_with_its_plan(tiny_dir, tmp_path):
    src, prof, out = tiny_dir("llama"), tmp_path / "prof", tmp_path / "out"
    proc = kvx("profile", str(src), "-o", str(prof), "--tokens", "256", "--seq-len", "128", "--target-kv-ratio", "2")
    assert proc.returncode == 0, proc.stderr
    assert "lazy ratio" in proc.stdout and "expected KV ratio 2.00x" in proc.stdout
    assert {p.name for p in prof.iterdir()} >= {"report.json", "plan.yaml", "lazy_ratio.png", "rank95.png"}
    clash = kvx("convert", str(src), "-o", str(out), "--plan", str(prof / "plan.yaml"), "--kv-rank", "8")
    assert_one_line_error(clash, "--plan sets every layer")
    proc = kvx("convert", str(src), "-o", str(out), "--plan", str(prof / "plan.yaml"), "--calib-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    assert "2.00x" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--window", "200"], "must be below --seq-len"),
        (["--rope-dims", "5"], "multiple of"),
        (["--target-kv-ratio", "40"], "no room for a latent"),
    ],
)
def test_profile_bad_options(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "prof"
    proc = kvx("profile", str(tiny_dir("llama")), "-o", str(out), "--tokens", "256", "--seq-len", "128", *args)
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_folder_without_tokenizer(tiny_dir, tmp_path):
    """Evaluating needs a tokenizer and says so plainly; a weights-only conversion does not need one."""
    src = tiny_dir("llama")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    assert_one_line_error(kvx("eval", str(src)), "has no tokenizer")
    out = tmp_path / "out"
    proc = kvx("convert", str(src), "-o", str(out), "--kv-rank", "16", "--rope-dims", "8", "--calib", "none")
    assert proc.returncode == 0, proc.stderr
    assert "has no tokenizer: none was copied" in proc.stderr
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    assert_one_line_error(
        kvx("convert", str(src), "-o", str(tmp_path / "calib"), "--kv-rank", "16", "--rope-dims", "8"),
        "has no tokenizer",
    )
