"""Write a converted model as a checkpoint users can load anywhere, all or nothing.

Everything goes to a temporary folder beside OUT and is renamed into place at the end,
so an interrupted run never leaves a half-written checkpoint at OUT.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import KvxError
from .io.staging import clean_stale, output_lock, pause_point, temp_prefix

INDEX_NAME = "model.safetensors.index.json"


def check_output(out: Path, overwrite: bool, expected_bytes: int = 0) -> None:
    """Fail before any work if OUT cannot be written (or, given its expected size, would not fit)."""
    if out.exists() and not overwrite:
        raise KvxError(f"output {out} already exists (pass --overwrite to replace it)")
    parent = out.resolve().parent
    while not parent.exists():  # the folders kvx would create: what matters is the first one that exists
        parent = parent.parent
    probe = parent / f".kvx-write-probe-{os.getpid()}"
    try:  # a real write says why it cannot be (permissions, a read-only mount), as os.access does not
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise KvxError(f"cannot write into {parent} ({e.strerror.lower()})") from None
    free = shutil.disk_usage(parent).free
    if expected_bytes and free < expected_bytes:
        raise KvxError(
            f"not enough free space for {out}: about {_mib(expected_bytes)} needed, {_mib(free)} free on its disk"
        )


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, as Python says it or as a Rust library (tokenizers, safetensors) words it."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(tensor_slice) -> int:
    """A stored tensor's size from the safetensors header alone."""
    numel = 1
    for d in tensor_slice.get_shape():
        numel *= d
    return numel * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 4)


def _ensure_index(folder: Path) -> None:
    """transformers writes an index only when it shards; kvx always ships one."""
    if (folder / INDEX_NAME).exists():
        return
    from safetensors import safe_open

    single = folder / "model.safetensors"
    shard = folder / "model-00001-of-00001.safetensors"
    single.rename(shard)
    with safe_open(shard, "pt") as f:
        names = list(f.keys())
        total = sum(_nbytes(f.get_slice(n)) for n in names)
    index = {"metadata": {"total_size": total}, "weight_map": {n: shard.name for n in names}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def save_checkpoint(
    model,
    tokenizer,
    out: str | Path,
    card: Callable[[Path], str],
    overwrite: bool = False,
    max_shard_size: str = "200MB",
) -> Path:
    """Save model + tokenizer + model card (``card(folder)`` returns its text); a kvx model's own
    ``save_pretrained`` adds its config format and runtime files."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)  # a kvx model also writes its runtime files
        if getattr(model.config, "kvx", None) and not (tmp / "modeling_kvx.py").is_file():
            raise RuntimeError(f"{type(model).__name__} is not a kvx runtime model: its checkpoint would not load")
        _ensure_index(tmp)
        if tokenizer is not None:  # weights-only conversions of a folder that has none
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card(tmp))
    return Path(out)


def writes_output(fn: Callable) -> Callable:
    """``fn(first, out, ...)`` refused at once if OUT cannot be written, and holding OUT's lock from its
    first line: a second run on OUT is refused before any work, not after it."""

    @functools.wraps(fn)
    def locked(first, out, *args, **kwargs):
        check_output(Path(out), overwrite=True)  # writability; whether OUT may exist, fn decides
        with output_lock(Path(out)):
            return fn(first, out, *args, **kwargs)

    return locked


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block succeeds, written by one
    process at a time; a full disk removes it and says so."""
    out = Path(out)
    check_output(out, overwrite, expected_bytes)
    with output_lock(out):
        check_output(out, overwrite)  # again: another run may have finished it before we took the lock
        clean_stale(out.parent, f".{out.name}.")
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{out.name}."), dir=out.parent))
        try:
            yield tmp
            pause_point("before-rename")
            os.chmod(tmp, 0o755)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                raise KvxError(
                    f"the disk filled up while writing {out}: the partial output was removed, nothing was written; "
                    "free some space and run again"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
