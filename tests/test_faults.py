"""Faults a user meets, injected for real: damaged and truncated files, a full and a read-only disk
(small tmpfs mounts, where the tests may mount), SIGKILL at named moments of a run (``KVX_PAUSE_AT``
stops kvx there so the kill lands deterministically), and two processes on one output folder.
Each case asserts the exit code, a single line on stderr without a traceback, and what is on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import kvx as kvx_lib

from .helpers import assert_one_line_error, kvx

# A tiny conversion that needs no sampling: bundled calibration text, no fitting.
CONVERT = ["--to", "mla", "--kv-rank", "8", "--rope-dims", "4", "--calib", "bundled"]
CONVERT += ["--calib-tokens", "512", "--calib-seq-len", "128", "--fit-steps", "0"]


@pytest.fixture
def env(tmp_path):
    """Each test's own kvx cache (the litter it checks for is its own)."""
    return {"KVX_CACHE": str(tmp_path / "cache"), "KVX_PAUSE_FILE": str(tmp_path / "paused")}


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _litter(folder: Path) -> list[str]:
    """kvx's temporary and lock files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def converted_once(tiny_dir_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "converted"
    proc = kvx("convert", str(tiny_dir_factory("llama")), "-o", str(out), *CONVERT)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def converted(converted_once, tmp_path):
    """A tiny kvx checkpoint of this test's own, to damage."""
    return Path(shutil.copytree(converted_once, tmp_path / "converted"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


DAMAGE = {
    "truncated shard": (lambda d: _truncate(next(d.glob("*.safetensors"))), ["safetensors", "truncated"]),
    "shard missing": (lambda d: next(d.glob("*.safetensors")).unlink(), ["is missing", "safetensors"]),
    "damaged index": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": '),
        ["model.safetensors.index.json", "not valid JSON"],
    ),
    "damaged config": (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    "damaged tokenizer": (lambda d: _truncate(d / "tokenizer.json"), ["tokenizer.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_the_file(case, converted, env):
    damage, fragments = DAMAGE[case]
    damage(converted)
    before = _listing(converted)
    proc = kvx("eval", str(converted), "--max-tokens", "256", "--seq-len", "128", env=env)
    assert_one_line_error(proc, *fragments, "re-download or re-convert")
    assert "Traceback" not in proc.stderr
    assert _listing(converted) == before  # nothing written, nothing removed


def test_a_truncated_gguf_is_one_line_and_leaves_no_cache(tmp_path, env):
    from kvx.loading import ALIASES, _alias_gguf

    whole = _alias_gguf(ALIASES["smollm2-135m"])
    cut = tmp_path / "cut.gguf"
    with whole.open("rb") as f:
        cut.write_bytes(f.read(whole.stat().st_size // 2))
    proc = kvx("convert", str(cut), "-o", str(tmp_path / "out"), *CONVERT, env=env)
    assert_one_line_error(proc, "cut.gguf", "damaged or truncated")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "gguf" / "cut").exists()


@contextmanager
def _tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


def test_too_little_space_is_refused_before_any_work(tiny_dir, tmp_path, env):
    with _tmpfs(tmp_path / "small", "1m") as disk:
        proc = kvx("convert", str(tiny_dir("llama")), "-o", str(disk / "out"), *CONVERT, env=env)
        assert_one_line_error(proc, "not enough free space", "MiB needed")
        assert list(disk.iterdir()) == []


def test_a_disk_that_fills_while_writing_leaves_nothing(tiny_dir, tmp_path, env):
    src = tiny_dir("llama")
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    # room for the expected weights, not for the tokenizer and runtime files besides them
    with _tmpfs(tmp_path / "small", f"{weights // 1024 + 64}k") as disk:
        proc = kvx("convert", str(src), "-o", str(disk / "out"), *CONVERT, env=env)
        assert_one_line_error(proc, "disk filled up", "nothing was written")
        assert list(disk.iterdir()) == []


def test_a_read_only_output_is_refused_before_any_work(tiny_dir, tmp_path, env):
    with _tmpfs(tmp_path / "ro", "8m", read_only=True) as disk:
        proc = kvx("convert", str(tiny_dir("llama")), "-o", str(disk / "out"), *CONVERT, env=env)
        assert_one_line_error(proc, "cannot write into", "read-only")


def _paused(args: list[str], env: dict, point: str, timeout: float = 300, python: tuple = ("-m", "kvx.cli")):
    """A kvx run (``python -m kvx.cli ARGS``, or ``python PYTHON ARGS``) stopped at ``point``."""
    marker = Path(env["KVX_PAUSE_FILE"])
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, *python, *args],
        env={**os.environ, **env, "KVX_PAUSE_AT": point},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"kvx ended before reaching {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"kvx never reached {point}"
        time.sleep(0.2)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()


def test_two_runs_on_one_output_then_a_kill_then_a_clean_rerun(tiny_dir, tmp_path, env):
    src, out = str(tiny_dir("llama")), tmp_path / "out"
    first = _paused(["convert", src, "-o", str(out), *CONVERT], env, "convert-layer")
    second = kvx("convert", src, "-o", str(out), *CONVERT, env=env)
    assert_one_line_error(second, str(out), "being written by another kvx process", f"pid {first.pid}")
    _kill(first)
    assert not out.exists()  # killed mid-conversion: no output, only its litter
    assert any(name.startswith(f".out.tmp-{first.pid}-") for name in _litter(tmp_path))
    third = kvx("convert", src, "-o", str(out), *CONVERT, env=env)
    assert third.returncode == 0, third.stderr
    assert f"took over the lock on {out} left by process {first.pid}" in third.stderr
    assert "left by an interrupted run" in third.stderr
    assert _litter(tmp_path) == []
    kvx_lib.load(str(out))


def test_a_kill_before_the_final_rename_leaves_the_previous_output(converted, tiny_dir, env):
    before = _listing(converted)
    proc = _paused(["convert", str(tiny_dir("llama")), "-o", str(converted), *CONVERT, "--kv-rank", "4",
                    "--overwrite"], env, "before-rename")  # fmt: skip
    _kill(proc)
    assert _listing(converted) == before  # the previous complete output, untouched
    kvx_lib.load(str(converted))


def test_a_kill_while_materialising_the_gguf_is_cleaned_by_the_next_run(tmp_path, env):
    code = "from kvx.loading import resolve; resolve('smollm2-135m')"
    _kill(_paused([code], env, "gguf-materialise", python=("-c",)))
    cache = tmp_path / "cache"
    assert not (cache / "smollm2-135m").exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith("smollm2-135m.tmp-")]
    again = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted run" in again.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"]


def test_a_kill_while_saving_a_step_checkpoint_resumes_from_the_last_whole_one(converted, tmp_path, env):
    healed = tmp_path / "healed"
    args = ["distill", str(converted), "-o", str(healed), "--data", "bundled", "--tokens", "1024"]
    args += ["--seq-len", "64", "--batch-size", "4", "--save-every", "1", "--eval-tokens", "256"]
    proc = _paused(args, env, "distill-checkpoint:3")
    _kill(proc)
    ckpts = healed / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-3.tmp", "step-1", "step-2"]
    assert not (healed / "config.json").exists()  # never mistaken for a finished model
    again = kvx(*args, "--resume", env=env)
    assert again.returncode == 0, again.stderr
    assert "from its checkpoint at step 2" in again.stderr
    assert not list(ckpts.glob(".step-*"))
    summary = json.loads((healed / "distill_summary.json").read_text())
    assert summary["steps"] == 4
    kvx_lib.load(str(healed))


def test_a_run_killed_between_stages_continues_where_it_stopped(tiny_dir, tmp_path, env):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {tiny_dir('llama')}\n"
        "convert: {to: mla, kv_rank: 8, rope_dims: 4, calib: bundled, calib_tokens: 512, calib_seq_len: 128, "
        "fit_steps: 0}\n"
        "eval: {max_tokens: 256, seq_len: 128}\n"
    )
    out = tmp_path / "run"
    _kill(_paused(["run", str(recipe), "-o", str(out)], env, "run-after-convert"))
    assert (out / "converted" / "config.json").exists() and not (out / "eval.json").exists()
    again = kvx("run", str(recipe), "-o", str(out), env=env)
    assert again.returncode == 0, again.stderr
    assert "[convert] already complete, skipped" in again.stdout + again.stderr
    assert set(json.loads((out / "eval.json").read_text())["rows"]) == {"original", "converted"}


def test_a_kill_during_export_leaves_no_export_and_the_next_one_cleans_up(tiny_dir, tmp_path, env):
    conv = tmp_path / "conv"
    proc = kvx("convert", str(tiny_dir("llama")), "-o", str(conv), *CONVERT, "--layout", "deepseek", env=env)
    assert proc.returncode == 0, proc.stderr
    _kill(_paused(["export", str(conv)], env, "before-rename"))
    assert not (tmp_path / "conv-deepseek").exists()
    again = kvx("export", str(conv), env=env)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted run" in again.stderr and _litter(tmp_path) == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "conv-deepseek")
