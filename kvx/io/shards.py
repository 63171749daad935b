"""Safetensors shards read and written a group of tensors at a time (mergekit's lazy loader and
streaming writer): converting a model then holds one layer, not the model twice."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import KvxError

INDEX_NAME = "model.safetensors.index.json"


class ShardReader:
    """The tensors of a safetensors checkpoint folder by name, read from disk when asked."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            where = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                where = {name: "model.safetensors" for name in f.keys()}
        else:
            raise KvxError(f"{folder} has no safetensors weights")
        self.where = where

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.where if n.startswith(prefix))

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened only for this call: a shard's pages are mapped while its
        tensors are copied out, then unmapped, so reading layer after layer does not add them up."""
        from safetensors import safe_open

        out, by_file = {}, {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for file, group in by_file.items():
            with safe_open(self.folder / file, "pt") as f:
                out.update({name: f.get_tensor(name) for name in group})
        return out

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix``, by its name with the prefix removed."""
        return {n[len(prefix) :]: t for n, t in self.read(self.names(prefix)).items()}


class ShardWriter:
    """Writes each group of tensors as its own shard as soon as it is given; ``finish`` names the
    shards as transformers does (``model-0000k-of-0000N.safetensors``) and writes the index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.parts.append((path, sorted(tensors)))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        n = len(self.parts)
        weight_map = {}
        for k, (path, names) in enumerate(self.parts, start=1):
            final = self.folder / f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
