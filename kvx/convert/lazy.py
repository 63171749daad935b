"""A model whose decoder layers stay on disk until they are converted.

The model is built without initialising its weights: its tensors are allocated but never
written, so the pages stay virtual and cost no resident memory, while the buffers the model
computes itself (RoPE frequencies, embedding scales) are computed as usual. The tensors
outside the decoder layers (embeddings, final norm, an untied head) are read from the
checkpoint; each layer is read from its shards only while the layer-at-a-time walker holds
it, and moved to the ``meta`` device (its memory freed) when the walker is done with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KvxError
from ..io import ShardReader
from ..loading import build_uninitialised


def is_local_checkpoint(source: str | None) -> bool:
    if source is None:
        return False
    path = Path(source)
    return path.is_dir() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file())


def skeleton(source: str, config, adapter, dtype: torch.dtype = torch.float32):
    """(the model with only its outer tensors read, the checkpoint's ``ShardReader``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    reader = ShardReader(source)
    model = build_uninitialised(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config).to(dtype)
    layers = tuple(adapter.layer_prefix(i) for i in range(adapter.n_layers))
    outer = reader.read([n for n in reader.names() if not n.startswith(layers)])
    missing, unexpected = model.load_state_dict(outer, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if not k.startswith(layers) and k not in tied]
    if missing or unexpected:
        raise KvxError(
            f"{source}: the checkpoint does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    return model.eval(), reader
