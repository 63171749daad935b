"""Layer-at-a-time conversion: calibrate each layer on the hidden states that reach it, convert
it, fit it, write it, move on (llm-compressor's sequential calibration, GPTQ's error
correction, mergekit's lazy loading).

The calibration windows go through the decoder one layer at a time. For each layer the
walker sees its attention input ``x`` and the base attention's output ``y`` on every batch;
from those it accumulates the layer's statistics (running sums), asks the layer's method for
its candidate weights, keeps the candidate whose attention output is closest to ``y`` on a
held-out batch, and optionally fits the method's new weights to ``y`` by gradient steps on
that layer alone. The next layer's input comes from the original layers (``inputs="original"``)
or from the layers already converted (``"converted"``), so that each layer corrects the errors
of those below. Each layer's cache is measured on the same text with the runtime's own cache
layer, against its spec.

The walking itself (each family's own decoder layer, called with the arguments its model
passes it) is ``kvx/layerwise.py``. With a ``ShardReader`` each layer is read from the
checkpoint only while it is being converted (``lazy.py``): memory holds the embeddings, one
layer and the calibration activations, whatever the depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import accumulate, new_stats
from ..errors import KvxError
from ..layerwise import Walker, attention_error, module_for, run_layer
from ..methods import LayerInput, LayerOutput, method_of
from ..modeling.kvx_common import cache_kwargs, layer_nbytes
from ..modeling.modeling_kvx import RUNTIMES
from ..plan import Plan

LOSSLESS = 1e-10  # a relative squared error below this is float32 round-off: nothing to fit (full-rank conversions)


@dataclass
class FitSettings:
    """Layer-wise fitting: ``steps`` Adam steps on the layer's new weights (0: none), and on the
    original projections named in ``also`` (``q_proj``, ``o_proj``): the queries can then learn to
    read the compressed keys, and the output projection to undo what the latent lost."""

    steps: int = 0
    lr: float = 1e-3
    also: tuple[str, ...] = ()
    check: int = 25  # steps between two held-out measurements


@dataclass
class LayerRecord:
    """What the walker measured for one layer."""

    candidates: dict[str, float] = field(default_factory=dict)  # relative attention-output error, held-out text
    chosen: str | None = None
    error_init: float | None = None
    error_fitted: float | None = None
    cache_bytes: int = 0  # the converted layer's cache after the probe batch (real cache layer)
    base_cache_bytes: int = 0


def _rows(value, j: int, batch: int):
    """Row ``j`` of every tensor in a call argument whose first dimension is the batch."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[j : j + 1]
    if isinstance(value, tuple):
        return tuple(_rows(v, j, batch) for v in value)
    return value


def _windows(xs, kwargs, ys) -> tuple[list, list, list]:
    """The batches split into single windows (a fitting step then costs one window's forward)."""
    out = ([], [], [])
    for x, kw, y in zip(xs, kwargs, ys):
        for j in range(x.shape[0]):
            out[0].append(x[j : j + 1])
            out[1].append({k: _rows(v, j, x.shape[0]) for k, v in kw.items()})
            out[2].append(y[j : j + 1])
    return out


def _fit(module, trainable: tuple[str, ...], train: tuple, held: tuple, held_error: float, fit: FitSettings) -> float:
    """Adam on the named submodules of ``module`` so that its output matches the targets, one
    calibration window per step, the windows in turn, on a cosine schedule. Every ``fit.check``
    steps the held-out error is measured and the best state so far kept; an error above the best
    means the step is too large for this layer (seen on SmolLM2's top layers at 1e-3): the best
    state comes back and the learning rate halves. The module ends in the best state, the
    initialisation (whose held-out error is ``held_error``) included; that state's error is returned."""
    xs, kwargs, ys = _windows(*train)
    params = [p for n, p in module.named_parameters() if n.split(".")[0] in trainable]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=fit.lr)
    best = (held_error, [p.detach().clone() for p in params])
    scale = 1.0
    for step in range(fit.steps):
        for group in opt.param_groups:
            group["lr"] = scale * fit.lr * 0.5 * (1 + math.cos(math.pi * step / fit.steps))
        b = step % len(xs)
        y_hat = module(hidden_states=xs[b], **kwargs[b])[0]
        loss = (y_hat - ys[b]).pow(2).mean() / ys[b].pow(2).mean().clamp_min(1e-30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % fit.check and step + 1 < fit.steps:
            continue
        err = attention_error(module, *held)
        if err < best[0]:
            best = (err, [p.detach().clone() for p in params])
        else:
            scale /= 2
            with torch.no_grad():
                for p, kept in zip(params, best[1]):
                    p.copy_(kept)
    for p in params:
        p.requires_grad_(False)
    return best[0]


def _cache_bytes(module, runtime_layer, n_layers: int, idx: int, x, kw) -> int:
    """Bytes ``module`` leaves in a real cache layer (``runtime_layer``) after one batch."""
    from transformers.cache_utils import Cache, DynamicLayer

    layers = [DynamicLayer() for _ in range(n_layers)]
    layers[idx] = runtime_layer
    cache = Cache(layers=layers)
    kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "use_cache")}
    module(hidden_states=x, **kw, **cache_kwargs(module, cache))
    return layer_nbytes(cache.layers[idx])


def _convert_alone(method, spec, layer_in, attn, config, meta, batches, fit: FitSettings):
    """A layer that runs alone: its method's candidates judged by attention-output error on the
    held-out batch (with calibration), the best one fitted if asked; (record, output, module)."""
    xs, kws, ys = batches
    calibrated = layer_in.stats is not None
    record = LayerRecord()
    held = (xs[-1:], kws[-1:], ys[-1:])  # the last batch, never trained on
    best = None
    for label, candidate in method.convert_candidates(spec, layer_in).items():
        module = module_for(attn, spec, config, meta, candidate.state)
        err = attention_error(module, *held) if calibrated else 0.0
        record.candidates[label] = err
        if best is None or err < best[0]:
            best = (err, label, candidate, module)
    record.error_init, record.chosen, chosen, module = best
    trainable = method.trainable(spec, layer_in.index)
    if calibrated and fit.steps and trainable and record.error_init > LOSSLESS:
        with torch.enable_grad():
            train = slice(0, max(1, len(xs) - 1))  # the held-out batch too when it is the only one
            record.error_fitted = _fit(
                module, trainable + fit.also, (xs[train], kws[train], ys[train]), held, record.error_init, fit
            )
        if record.error_fitted < record.error_init:
            state_fitted = {k: v.detach().clone() for k, v in module.state_dict().items()}
            chosen = LayerOutput(state_fitted, chosen.dropped, chosen.info)
    return record, chosen, module


@torch.no_grad()
def sequential_convert(
    walker: Walker,
    plan: Plan,
    calibrated: bool,
    meta: dict,
    emit: Callable[[int, LayerOutput, nn.Module], None],
    *,
    inputs: str = "original",
    fit: FitSettings | None = None,
    options: dict | None = None,
    on_layer=None,
    store: dict | None = None,
) -> dict[int, LayerRecord]:
    """Every layer of ``plan`` converted in order; ``emit(i, output, layer)`` receives each one while
    its base decoder layer is still in memory (to collect it, or to write its shard). ``store``:
    by kind, what each method's ``observe`` records for its model-level state."""
    fit = fit or FitSettings()
    model, adapter = walker.model, walker.adapter
    config = model.config
    hs = walker.hs
    hs_conv = list(hs) if inputs == "converted" else None
    sliding = [adapter.sliding_window(i) is not None for i in range(adapter.n_layers)]
    records = {}
    for i, spec in enumerate(plan.layers):
        layer = walker.layer(i)
        attn = adapter.attention(model, i)
        method = method_of(spec)
        opts = (options or {}).get(spec.kind, {})
        queries = calibrated and "calibration" in method.needs(spec, calibrated, opts)
        stats = new_stats(config.hidden_size)
        xs, kws, ys, next_hs = [], [], [], []
        for b, h in enumerate(hs):
            out, x, kw, y = run_layer(layer, attn, h, walker.calls[b][i])
            next_hs.append(out)
            if hs_conv is not None:  # the converted stream's input to this layer; the target stays the original's
                x = run_layer(layer, attn, hs_conv[b], walker.calls[b][i])[1]
            if calibrated:
                accumulate(stats, attn, x, adapter, queries)
            xs.append(x), kws.append(kw), ys.append(y)
        layer_in = LayerInput.read(
            adapter, model, i, stats if calibrated else None, opts, plan.layers, walker.attention_state
        )
        if calibrated and store is not None:
            method.observe(spec, layer_in, attn, xs, kws, store.setdefault(spec.kind, {}))
        runtime = RUNTIMES[spec.kind]
        if method.standalone(spec, i):
            record, chosen, module = _convert_alone(method, spec, layer_in, attn, config, meta, (xs, kws, ys), fit)
            record.cache_bytes = _cache_bytes(
                module, runtime.cache_layer(spec, config, sliding[i], i), adapter.n_layers, i, xs[0], kws[0]
            )
        else:  # it reads another layer's cache: judged, measured and healed with the whole model
            chosen = method.convert_layer(spec, layer_in)
            record, module = LayerRecord(chosen="default"), attn
            cache_layer = runtime.cache_layer(spec, config, sliding[i], i)
            if spec.cached_floats(adapter.geometry(), i):  # what it keeps of what the base attention stores
                record.cache_bytes = _cache_bytes(attn, cache_layer, adapter.n_layers, i, xs[0], kws[0])
            else:
                record.cache_bytes = layer_nbytes(cache_layer)
        record.base_cache_bytes = _cache_bytes(
            attn, RUNTIMES["full"].cache_layer(spec, config, sliding[i], i), adapter.n_layers, i, xs[0], kws[0]
        )
        if hs_conv is not None:
            with adapter.attention_replaced(model, i, module):
                hs_conv = [run_layer(layer, module, h, walker.calls[b][i])[0] for b, h in enumerate(hs_conv)]
        emit(i, chosen, layer)
        records[i] = record
        walker.release(i)
        hs = next_hs
        if on_layer:
            on_layer(1)
    if not records:
        raise KvxError("the plan has no layers")
    return records
