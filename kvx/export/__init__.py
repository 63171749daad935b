"""Exports of kvx plans into formats serving engines already run, without kvx's runtime.
One module per format; each says which plans it can express (``check``) before any work."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import check_output
from ..errors import KvxError
from .base import Exporter
from .deepseek import DeepseekExport, check_deepseek_plan, to_deepseek
from .native import NativeExport, export_native, native_layer_types

EXPORTS: dict[str, Exporter] = {e.name: e for e in (NativeExport(), DeepseekExport())}


def check_export(fmt: str) -> Exporter:
    if fmt not in EXPORTS:
        raise KvxError(f"--export {fmt!r} is not available (available: {', '.join(EXPORTS)})")
    return EXPORTS[fmt]


def run_export(exporter: Exporter, base, converted, tokenizer, adapter, plan, out, overwrite: bool) -> Path:
    return exporter.write(base, Path(converted), tokenizer, adapter, plan, Path(out), overwrite)


def export_checkpoint(src: str, fmt: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """``kvx export SRC --format deepseek``: a kvx checkpoint re-laid out for serving engines (default OUT: SRC-FORMAT).
    Formats that need the base model's weights (``native``) are written by ``kvx convert --export``."""
    from ..arch import get_adapter
    from ..loading import load_source, load_tokenizer
    from ..plan import Plan

    if fmt != "deepseek":
        raise KvxError(
            f"--format {fmt!r} is not available (available: deepseek; 'native' via kvx convert --export native)"
        )
    if not (Path(src) / "config.json").is_file():
        raise KvxError(f"checkpoint folder not found: {src} (kvx export reads a local kvx checkpoint)")
    out = Path(out) if out else Path(str(Path(src)).rstrip("/") + f"-{fmt}")
    check_output(out, overwrite)
    source, _, config = load_source(src)
    if not getattr(config, "kvx", None):
        raise KvxError(f"{src} is not a kvx checkpoint: convert it first (kvx convert ... --to mla --layout deepseek)")
    exporter = check_export(fmt)
    adapter, plan = get_adapter(config), Plan.from_config(config)
    exporter.check(plan, adapter)
    return run_export(exporter, None, src, load_tokenizer(source, config), adapter, plan, out, overwrite)


__all__ = [
    "EXPORTS",
    "Exporter",
    "check_deepseek_plan",
    "check_export",
    "export_checkpoint",
    "export_native",
    "native_layer_types",
    "run_export",
    "to_deepseek",
]
