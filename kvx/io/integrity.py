"""Is a model folder or GGUF file whole? Checked from headers and sizes before anything loads, so
that an interrupted copy or download is one clear line naming the damaged file, not a library's
traceback after minutes of work.

A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes; the header's
largest end offset says how long the file must be, so a truncated shard is caught without reading
its tensors. JSON files (config, index, tokenizer) must parse; every shard the index names must
exist. A GGUF is parsed by the ``gguf`` package's reader, which maps every tensor it declares.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import KvxError
from .shards import INDEX_NAME

JSON_FILES = ("config.json", "generation_config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json")


def _damaged(path: Path, what: str, folder: Path) -> KvxError:
    return KvxError(f"{path} is damaged ({what}): re-download or re-convert {folder}")


def _check_json(path: Path, folder: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"not valid JSON: {str(e).splitlines()[0]}", folder) from None


def check_safetensors(path: Path, folder: Path | None = None) -> None:
    """``path``'s header parses and the file holds every byte the header declares."""
    folder = folder or path.parent
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"truncated: {size} bytes, not even a header", folder)
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise _damaged(path, f"truncated: {size} bytes, its header alone declares {8 + n}", folder)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _damaged(path, "its header is not valid JSON", folder) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise _damaged(path, f"truncated: {size} of {expected} bytes", folder)


def check_folder(folder: str | Path) -> None:
    """Every file a local model folder needs is present and whole (headers and sizes only)."""
    folder = Path(folder)
    for name in JSON_FILES:
        if (folder / name).is_file():
            _check_json(folder / name, folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _check_json(index, folder)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise _damaged(index, "no weight_map", folder)
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise KvxError(f"{folder / shard} is missing (the index names it): re-download or re-convert {folder}")
    for shard in sorted(folder.glob("*.safetensors")):
        check_safetensors(shard, folder)


def check_gguf(path: Path, remedy: str = "re-download it") -> None:
    """A GGUF file whose every declared tensor is there."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise KvxError(f"{path} is not a GGUF file (no GGUF magic): {remedy}")
    try:
        from gguf import GGUFReader

        GGUFReader(path)
    except Exception as e:  # the reader raises whatever numpy or struct say about a short file
        raise KvxError(
            f"{path} is damaged or truncated ({path.stat().st_size} bytes; {type(e).__name__}): {remedy}"
        ) from None
