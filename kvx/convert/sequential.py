"""Layer-at-a-time conversion: calibrate each layer on the hidden states that reach it, convert
it, fit it, move on (llm-compressor's sequential calibration, GPTQ's error correction).

The calibration windows go through the decoder one layer at a time. For each layer the
runner sees its attention input ``x`` and the base attention's output ``y`` on every batch;
from those it accumulates the layer's statistics (running sums), asks the layer's method for
its candidate weights, keeps the candidate whose attention output is closest to ``y`` on a
held-out batch, and optionally fits the method's new weights to ``y`` by gradient steps on
that layer alone. The next layer's input comes from the original layers (``inputs="original"``)
or from the layers already converted (``"converted"``), so that each layer corrects the errors
of those below. Only one layer's activations are held at a time.

Every family's own decoder layer runs here, with the call arguments (masks, RoPE) its model
passes it: they are captured from one ordinary forward per batch, so kvx never rebuilds masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..calibration import accumulate, new_stats
from ..methods import LayerInput, LayerOutput, method_of
from ..modeling.modeling_kvx import RUNTIMES
from ..plan import Plan


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


@dataclass
class FitSettings:
    """Layer-wise fitting: ``steps`` Adam steps on the layer's new weights alone (0: none)."""

    steps: int = 0
    lr: float = 1e-3


@dataclass
class LayerRecord:
    """What the runner measured for one layer (for the conversion summary)."""

    error_init: float | None = None  # relative attention-output error of the chosen initialisation
    error_fitted: float | None = None
    chosen: str | None = None
    candidates: dict[str, float] = field(default_factory=dict)


def _decoder_calls(model, adapter, batch: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """One forward of ``batch``: the first decoder layer's input and every layer's call arguments."""
    layers = adapter.decoder_layers(model)
    calls: list[dict] = [{} for _ in layers]
    first: list[torch.Tensor] = []

    def grab(i):
        def hook(module, args, kwargs):
            if i == 0:
                first.append(kwargs.get("hidden_states", args[0] if args else None))
            calls[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == len(layers) - 1:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.get_decoder()(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return first[0], calls


def _run_layer(layer, attn, h: torch.Tensor, call: dict) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
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


def _attention_error(module, xs: list, kwargs: list, ys: list) -> float:
    """Relative squared error of ``module``'s output against the targets, over the given batches."""
    err = ref = 0.0
    with torch.no_grad():
        for x, kw, y in zip(xs, kwargs, ys):
            y_hat = module(hidden_states=x, **kw)[0]
            err += float((y_hat.double() - y.double()).pow(2).sum())
            ref += float(y.double().pow(2).sum())
    return err / max(ref, 1e-30)


def _module_for(base_attn, spec, config, meta: dict, state: dict):
    """The runtime's attention module for ``spec``, holding ``state`` (float32, trainable)."""
    module = RUNTIMES[spec.kind].attention(copy.deepcopy(base_attn), spec, config, meta).float()
    module.load_state_dict(state, strict=True)
    return module


def _fit(module, trainable: tuple[str, ...], xs, kwargs, ys, fit: FitSettings) -> None:
    """Adam on the named submodules of ``module`` so that its output matches ``ys`` (batches in turn)."""
    params = [p for n, p in module.named_parameters() if n.split(".")[0] in trainable]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=fit.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, fit.steps)
    for step in range(fit.steps):
        b = step % len(xs)
        y_hat = module(hidden_states=xs[b], **kwargs[b])[0]
        loss = (y_hat - ys[b]).pow(2).mean() / ys[b].pow(2).mean().clamp_min(1e-30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for p in params:
        p.requires_grad_(False)


@torch.no_grad()
def sequential_convert(
    base,
    plan: Plan,
    adapter,
    windows: torch.Tensor,
    calibrated: bool,
    meta: dict,
    *,
    batch_size: int = 4,
    inputs: str = "original",
    fit: FitSettings | None = None,
    options: dict | None = None,
    on_layer=None,
) -> tuple[dict[int, LayerOutput], dict[int, LayerRecord]]:
    """Every layer of ``plan`` converted in order over the calibration ``windows`` ([n, T] ids)."""
    fit = fit or FitSettings()
    batches = [windows[i : i + batch_size].to(base.device) for i in range(0, windows.shape[0], batch_size)]
    hs, calls = zip(*(_decoder_calls(base, adapter, b) for b in batches))
    hs, calls = list(hs), list(calls)
    hs_conv = list(hs) if inputs == "converted" else None
    layers = adapter.decoder_layers(base)
    outputs, records = {}, {}
    for i, spec in enumerate(plan.layers):
        layer, attn = layers[i], adapter.attention(base, i)
        method = method_of(spec)
        queries = "calibration" in method.needs(spec, calibrated, (options or {}).get(spec.kind))
        stats = new_stats(base.config.hidden_size)
        xs, kws, ys, next_hs = [], [], [], []
        for b, h in enumerate(hs):
            out, x, kw, y = _run_layer(layer, attn, h, calls[b][i])
            next_hs.append(out)
            if hs_conv is not None:  # the converted stream's input to this layer; the target stays the original's
                x = _run_layer(layer, attn, hs_conv[b], calls[b][i])[1]
            accumulate(stats, attn, x, adapter, queries)
            xs.append(x), kws.append(kw), ys.append(y)
        state = adapter.attention_state(base, i)
        layer_in = LayerInput(
            i,
            state,
            adapter.attention_weights(state),
            adapter,
            adapter.k_norm_weight(state),
            stats if calibrated else None,
            (options or {}).get(spec.kind, {}),
        )
        candidates = method.convert_candidates(spec, layer_in)
        record = LayerRecord()
        held_out = slice(len(xs) - 1, len(xs)) if len(xs) > 1 else slice(0, 1)
        best, best_err = None, None
        for label, candidate in candidates.items():
            module = _module_for(attn, spec, base.config, meta, candidate.state)
            err = _attention_error(module, xs[held_out], kws[held_out], ys[held_out])
            record.candidates[label] = err
            if best_err is None or err < best_err:
                best, best_err, best_module = (label, candidate), err, module
        record.chosen, record.error_init = best[0], best_err
        chosen = best[1]
        trainable = method.trainable(spec)
        if fit.steps and trainable:
            train = slice(0, max(1, len(xs) - 1))
            with torch.enable_grad():
                _fit(best_module, trainable, xs[train], kws[train], ys[train], fit)
            fitted_err = _attention_error(best_module, xs[held_out], kws[held_out], ys[held_out])
            if fitted_err <= best_err:  # fitting may never make the layer worse than its initialisation
                chosen = LayerOutput(
                    {k: v.detach().clone() for k, v in best_module.state_dict().items()}, chosen.dropped, chosen.info
                )
                record.error_fitted = fitted_err
            else:
                record.error_fitted = best_err
        outputs[i], records[i] = chosen, record
        if hs_conv is not None:
            module = _module_for(attn, spec, base.config, meta, chosen.state)
            with adapter.attention_replaced(base, i, module):
                hs_conv = [_run_layer(layer, module, h, calls[b][i])[0] for b, h in enumerate(hs_conv)]
        hs = next_hs
        if on_layer:
            on_layer(1)
    return outputs, records
