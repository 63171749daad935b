"""The interface of one native export format (a format serving engines run without kvx)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class Exporter:
    name: ClassVar[str]
    spec_defaults: ClassVar[dict[str, dict]] = {}  # per spec kind: option defaults this format implies

    def check(self, plan, adapter) -> None:
        """Refuse (``KvxError``), before any work, a plan or family this format cannot express."""
        raise NotImplementedError

    def write(self, base, converted, tokenizer, adapter, plan, out: Path, source: str, overwrite: bool) -> Path:
        """Write the export of ``converted`` (built from ``base`` per ``plan``) atomically at ``out``."""
        raise NotImplementedError
