"""Helpers shared by the tests: loading a checkpoint as a user without kvx would, every
tensor of a sharded checkpoint, the transformers range kvx declares (read from the
installed package's own metadata), and the command line run as a user runs it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors.torch import load_file

# Runs in a fresh interpreter where `import kvx` fails, as on a user's machine without kvx.
# For each checkpoint it writes what it saw to one .pt file: versions, layer and cache
# classes, logits, generated tokens, and the bytes each cache layer holds after the prompt.
RELOAD_WITHOUT_KVX = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class NoKvx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "kvx" or name.startswith("kvx."):
                raise ImportError("kvx is not installed here")
    sys.meta_path.insert(0, NoKvx())
    import torch, transformers
    from transformers import AutoModelForCausalLM
    def cache_of(o):
        return o.cache if "cache" in type(o).__dataclass_fields__ else o.past_key_values
    def nbytes(layer):
        if hasattr(layer, "nbytes"):
            return int(layer.nbytes())
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    ids = torch.tensor(json.loads(sys.argv[2]))
    seen = {}
    for path in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(ids, use_cache=True)
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        seen[path] = {
            "kvx_imported": "kvx" in sys.modules,
            "transformers": transformers.__version__,
            "attention": [type(layer.self_attn).__name__ for layer in model.model.layers],
            "cache_layers": [type(layer).__name__ for layer in cache_of(gen).layers],
            "cache_bytes": [nbytes(layer) for layer in cache_of(out).layers],
            "tokens": gen.sequences[0].tolist(),
            "logits": out.logits,
        }
    torch.save(seen, sys.argv[3])
    """
)


def assert_same_function(a, b, ids: torch.Tensor, atol: float = 1e-4) -> None:
    """``a`` and ``b`` (cast to float64 in place) give the same logits on ``ids``. A real model in
    float32 is only as exact as the CPU's kernels: SmolLM2's own float32 logits differ from its
    float64 ones by ~2e-4 on one CPU and less on another, so an exact conversion is judged in float64
    (there ~2e-5 is left, the float32 rounding of the weights a conversion or export rewrote)."""
    with torch.no_grad():
        torch.testing.assert_close(a.double()(ids).logits, b.double()(ids).logits, atol=atol, rtol=0)


def assert_batch_ops_follow_each_sequence(model, prompts: torch.Tensor, steps: torch.Tensor) -> None:
    """Prefill two ``prompts``, then beam search's reorder and contrastive search's repeat and
    select on the cache (rows 1, 0, 0 in the end), then decode ``steps`` (``[3, n]``) one token at
    a time: the logits equal those of a fresh cache prefilled with the prompts in that order."""
    from torch.testing import assert_close

    from kvx.measure.kv import new_cache
    from kvx.modeling.kvx_common import cache_kwargs

    moved, fresh = new_cache(model), new_cache(model)
    with torch.no_grad():
        model(prompts, **cache_kwargs(model, moved))
        moved.reorder_cache(torch.tensor([1, 0]))
        moved.batch_repeat_interleave(2)  # rows 1, 1, 0, 0
        moved.batch_select_indices(torch.tensor([0, 2, 3]))  # rows 1, 0, 0
        model(prompts[[1, 0, 0]], **cache_kwargs(model, fresh))
        for t in range(steps.shape[1]):
            step = steps[:, t : t + 1]
            assert_close(
                model(step, **cache_kwargs(model, moved)).logits, model(step, **cache_kwargs(model, fresh)).logits
            )


def reload_many_without_kvx(checkpoints: list[Path], ids: torch.Tensor, pythonpath: Path | None = None) -> dict:
    """Load each checkpoint with ``trust_remote_code`` in one fresh interpreter without kvx (and,
    with ``pythonpath``, the transformers installed there in front); what each computed, by path."""
    out = Path(checkpoints[0]).parent / f"reload-{os.getpid()}-{pythonpath.name if pythonpath else 'here'}.pt"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    paths = [str(c) for c in checkpoints]
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_KVX, json.dumps(paths), json.dumps(ids.tolist()), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = torch.load(out)
    return {Path(p): seen[p] for p in paths}


def reload_without_kvx(checkpoint: Path, ids: torch.Tensor, pythonpath: Path | None = None) -> dict:
    """``reload_many_without_kvx`` for one checkpoint."""
    return next(iter(reload_many_without_kvx([checkpoint], ids, pythonpath).values()))


def declared_transformers_range() -> tuple[Version, Version]:
    """(oldest, newest) transformers that kvx's package metadata admits; both bounds must exist."""
    for line in importlib.metadata.requires("kvx") or []:
        req = Requirement(line)
        if req.name == "transformers":
            lo = [Version(s.version) for s in req.specifier if s.operator == ">="]
            hi = [Version(s.version) for s in req.specifier if s.operator == "<="]
            assert lo and hi, f"kvx must declare transformers as >=OLDEST,<=NEWEST (tested), not {req.specifier}"
            return lo[0], hi[0]
    raise AssertionError("kvx declares no transformers requirement")


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whatever its sharding (kvx writes a shard per layer)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def kvx(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "kvx.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    # the progress announcements kvx prints off a terminal ("converting layer by layer ...") are not errors
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.endswith(" ...")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
