"""Progress reporting for slow library calls: ``progress(description, total) -> advance(n, info=None)``.

The CLI passes one that draws rich bars; library callers may pass nothing."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int], Callable[..., None]]


def no_progress(description: str, total: int) -> Callable[..., None]:
    return lambda n, info=None: None
