"""Where kvx writes before an output is complete: temporary folders named by their writer's pid, and
one lock per output, so that two runs never write one folder and a killed run's litter is cleaned.
Named pause points let the fault-injection tests kill a run at an exact moment.

Temporary folders are ``{prefix}tmp-{pid}-{random}`` beside what they become (``{prefix}old-{pid}``
for a replaced output on its way out); one whose process is gone is removed by the next run that
writes there. The lock is ``.{name}.lock`` beside the output, held with ``flock`` (the kernel
releases it when its process dies, even by SIGKILL) and holding the writer's pid for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import KvxError

_STALE = re.compile(r"(?:tmp-(\d+)-.*|old-(\d+))$")


def note(message: str) -> None:
    """A line for the user that is not an error (the CLI's stderr)."""
    print(f"kvx: {message}", file=sys.stderr, flush=True)


_PASSED: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Fault injection: with ``KVX_PAUSE_AT=name`` (or ``name:N``, the N-th time it is reached), stop
    here after writing our pid to ``KVX_PAUSE_FILE``, so that a test's SIGKILL lands at this moment."""
    want, _, nth = os.environ.get("KVX_PAUSE_AT", "").partition(":")
    if want != name:
        return
    _PASSED[name] = _PASSED.get(name, 0) + 1
    if _PASSED[name] != int(nth or 1):
        return
    if marker := os.environ.get("KVX_PAUSE_FILE"):
        Path(marker).write_text(str(os.getpid()))
    time.sleep(float(os.environ.get("KVX_PAUSE_SECONDS", "3600")))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_prefix(prefix: str) -> str:
    """The ``mkdtemp`` prefix of this process's temporary folders named ``prefix...``."""
    return f"{prefix}tmp-{os.getpid()}-"


def clean_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the temporary folders ``prefix...`` in ``parent`` whose writer is gone; say so."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        match = _STALE.match(path.name[len(prefix) :])
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            note(f"removed {path}, left by an interrupted run (process {pid})")
            removed.append(path)
    return removed


def _locked(path: Path, out: Path) -> int:
    """An open descriptor of ``path`` holding its flock (retried if the file was replaced meanwhile)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise KvxError(
                f"{out} is being written by another kvx process (pid {holder}): wait for it to finish, or write "
                "somewhere else"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by the holder we waited for
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


_HELD: dict[Path, int] = {}  # locks this process holds, by path: a stage may lock what its caller locked


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block, or fail at once naming the process that holds it."""
    if os.environ.get("RANK", "0") != "0":  # a worker of a distributed launch: its rank 0 holds the lock
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = (out.parent / f".{out.name}.lock").resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    fd = _locked(path, out)
    _HELD[path] = 1
    try:
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid():
            note(f"took over the lock on {out} left by process {previous}, which is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            path.unlink(missing_ok=True)
    finally:
        del _HELD[path]
        os.close(fd)
