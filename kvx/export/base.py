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

    def write(self, base: str | None, converted: Path, tokenizer, adapter, plan, out: Path, overwrite: bool) -> Path:
        """Write atomically at ``out`` the export of the kvx checkpoint ``converted``, made per ``plan``
        from the model ``base`` (a folder or Hub id; None when only the checkpoint is at hand)."""
        raise NotImplementedError
