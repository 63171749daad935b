"""Checkpoint I/O a tensor at a time: a lazy reader over safetensors shards and a streaming shard writer."""

from .shards import ShardReader, ShardWriter

__all__ = ["ShardReader", "ShardWriter"]
