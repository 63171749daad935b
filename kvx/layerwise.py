"""Walking a model's decoder a layer at a time over calibration windows: the machinery shared by
layer-at-a-time conversion (``convert/sequential.py``) and the profile's sensitivity sweep.

Every family's own decoder layer runs here, with the call arguments (masks, RoPE) its model
passes it: they are recorded from one pass of the model's own forward with stand-ins for the
layers, so kvx never rebuilds masks. With a ``ShardReader`` each layer is read from the
checkpoint only while it is in use (``convert/lazy.py``).
"""

from __future__ import annotations

import copy
import ctypes

import torch
from torch import nn

from .modeling.modeling_kvx import RUNTIMES


class _Recorder(nn.Module):
    """Stands in for a decoder layer during one model forward: records the call, passes ``h`` on."""

    def __init__(self, layer: nn.Module, calls: list, i: int, first: list):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # some models pick masks by it
        self.calls, self.i, self.first = calls, i, first

    def forward(self, hidden_states, *args, **kwargs):
        if self.i == 0:
            self.first.append(hidden_states)
        self.calls[self.i] = kwargs
        return hidden_states


class Walker:
    """A model's decoder, a layer at a time, over batches of calibration windows.

    ``reader``: the checkpoint's ``ShardReader`` when ``model``'s layers are still to be read (one at
    a time, ``lazy.skeleton``); None when the model is in memory."""

    def __init__(self, model, adapter, batches: list[torch.Tensor], reader=None):
        self.model, self.adapter, self.reader = model, adapter, reader
        self.layers = adapter.decoder_layers(model)
        self.hs, self.calls = [], []
        originals = list(self.layers)
        for batch in batches:
            calls, first = [None] * len(originals), []
            for i, layer in enumerate(originals):
                self.layers[i] = _Recorder(layer, calls, i, first)
            try:
                model.get_decoder()(input_ids=batch, use_cache=False)
            finally:
                for i, layer in enumerate(originals):
                    self.layers[i] = layer
            self.hs.append(first[0])
            self.calls.append(calls)

    def layer(self, i: int) -> nn.Module:
        if self.reader is not None:
            self.layers[i].load_state_dict(self.reader.state(self.adapter.layer_prefix(i)), strict=True)
        return self.layers[i]

    def attention_state(self, j: int) -> dict[str, torch.Tensor]:
        """Layer ``j``'s attention state as ``ArchAdapter.attention_state`` gives it, read from the
        checkpoint when the layers are not all in memory (a method that reads other layers asks)."""
        if self.reader is None:
            return self.adapter.attention_state(self.model, j)
        state = self.reader.state(self.adapter.attention_prefix(j))
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def release(self, i: int) -> None:
        if self.reader is not None:
            self.layers[i] = self.layers[i].to("meta")
            return_freed_memory()


def return_freed_memory() -> None:
    """Hand memory freed by a finished layer back to the OS (glibc keeps freed heap pages otherwise,
    and the resident size would grow by a layer per layer)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def run_layer(layer, attn, h: torch.Tensor, call: dict) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """Decoder layer on ``h``: (its output, its attention's input, the attention's other arguments, its output)."""
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def post(module, args, kwargs, output):
        seen["y"] = output[0] if isinstance(output, tuple) else output

    handles = [
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        attn.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        out = layer(h, **call)
    finally:
        for handle in handles:
            handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out, seen["x"], seen["kwargs"], seen["y"]


def attention_error(module, xs: list, kwargs: list, ys: list) -> float:
    """Relative squared error of ``module``'s output against the targets, over the given batches."""
    err = ref = 0.0
    with torch.no_grad():
        for x, kw, y in zip(xs, kwargs, ys):
            y_hat = module(hidden_states=x, **kw)[0]
            err += float((y_hat.double() - y.double()).pow(2).sum())
            ref += float(y.double().pow(2).sum())
    return err / max(ref, 1e-30)


def module_for(base_attn, spec, config, meta: dict, state: dict):
    """The runtime's attention module for ``spec``, holding ``state`` (float32)."""
    module = RUNTIMES[spec.kind].attention(copy.deepcopy(base_attn), spec, config, meta).float()
    module.load_state_dict(state, strict=True)
    return module
