"""Runtime for kvx checkpoints: the base model with some attention layers swapped, per plan.

This file and its siblings (``configuration_kvx.py``, ``kvx_specs.py``, ``kvx_common.py`` and
one ``kvx_<kind>.py`` per layer spec) are copied into every checkpoint kvx writes and are
loaded there through ``auto_map`` by
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. They import only
torch and transformers (and each other, by flat relative imports, which transformers'
dynamic-module loader follows), never kvx.

How it works: ``config.json`` is the base model's own config plus a ``kvx`` entry that holds
the per-layer plan (``configuration_kvx.py``). ``KvxForCausalLM`` resolves the base family's
native causal-LM class (e.g. ``LlamaForCausalLM``), subclasses it once, and after the native
``__init__`` asks each layer's runtime (``RUNTIMES``, one per spec kind) for its attention
module; ``make_cache`` asks them for their cache layers. Everything else (embeddings, MLP,
norms, RoPE, masks, ``generate``) stays the family's own code.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from functools import partial
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_kvx import KVX_CONFIG_KEY, KvxConfig, base_config, kvx_config_dict, load_config
from .kvx_common import (  # noqa: F401  (re-exported: the library and tests read them from here)
    NEW_CACHE_ARG,
    OLD_CACHE_ARG,
    KvxCache,
    LayerRuntime,
    cache_arg,
    cache_kwargs,
    cache_nbytes,
    layer_nbytes,
    output_cache,
    pop_cache,
)
from .kvx_condensed import CondensedRuntime
from .kvx_evict import EvictRuntime
from .kvx_mapped import MappedRuntime
from .kvx_mla import MLARuntime
from .kvx_specs import spec_from_dict
from .kvx_streaming import StreamingRuntime

# One line per layer spec kind: how its layers run. ``full`` keeps the base attention.
RUNTIMES: dict[str, LayerRuntime] = {
    "full": LayerRuntime(),
    "mla": MLARuntime(),
    "streaming": StreamingRuntime(),
    "condensed": CondensedRuntime(),
    "evict": EvictRuntime(),
    "mapped": MappedRuntime(),
}


def kvx_layers(config) -> list:
    """The per-layer specs of a kvx config, as the spec dataclasses."""
    return [spec_from_dict(d) for d in getattr(config, KVX_CONFIG_KEY)["layers"]]


def _runtime(kind: str) -> LayerRuntime:
    if kind not in RUNTIMES:
        raise ValueError(
            f"layer spec kind {kind!r} is not supported by this runtime (supported: {', '.join(RUNTIMES)})"
        )
    return RUNTIMES[kind]


def _kinds(specs) -> dict[str, list[int]]:
    """Layers by spec kind, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for idx, spec in enumerate(specs):
        out.setdefault(spec.kind, []).append(idx)
    return out


def apply_kvx_plan(model: nn.Module) -> None:
    """Give every layer of a freshly built base model the attention its spec's runtime builds."""
    config = model.config
    meta = getattr(config, KVX_CONFIG_KEY)
    specs = kvx_layers(config)
    decoder_layers = model.model.layers
    for idx, spec in enumerate(specs):
        decoder_layers[idx].self_attn = _runtime(spec.kind).attention(decoder_layers[idx].self_attn, spec, config, meta)
    for kind, layers in _kinds(specs).items():
        RUNTIMES[kind].init_model(model, layers)


def make_cache(config) -> Cache:
    """One cache layer per decoder layer, each from its spec's runtime."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    layers = [
        _runtime(spec.kind).cache_layer(spec, config, layer_type == "sliding_attention", i)
        for i, (spec, layer_type) in enumerate(zip(kvx_layers(config), layer_types))
    ]
    return KvxCache(layers=layers)


def runtime_files() -> list[Path]:
    """This file and every sibling it imports (what a checkpoint must carry)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    here = Path(__file__)
    return [here] + sorted({Path(f) for f in get_relative_import_files(str(here))} - {here})


def write_checkpoint_files(folder: str | Path) -> None:
    """Make a folder that ``save_pretrained`` wrote a kvx checkpoint: kvx's own config.json
    (model_type ``kvx``, ``auto_map``) and the runtime files beside it."""
    folder = Path(folder)
    path = folder / "config.json"
    path.write_text(json.dumps(kvx_config_dict(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")
    for f in runtime_files():
        (folder / f.name).write_bytes(f.read_bytes())


_CLASS_CACHE: dict[type, type] = {}


def kvx_class_for(config) -> type:
    """The family's causal-LM class with kvx's layer swap after its own ``__init__``."""
    base_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if base_cls not in _CLASS_CACHE:
        name = cache_arg(base_cls)
        positional = list(inspect.signature(base_cls.forward).parameters)[2:]  # after self, input_ids

        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            apply_kvx_plan(self)
            kinds = _kinds(kvx_layers(config))
            # model-level forward hooks of the kinds present (a multi-pass prefill, say)
            self._kvx_forward_hooks = [
                RUNTIMES[k] for k in kinds if type(RUNTIMES[k]).forward is not LayerRuntime.forward
            ]
            self._kvx_needs_cache = any(RUNTIMES[k].needs_cache for k in kinds)

        def forward(self, input_ids=None, *args, use_cache=None, **kwargs):
            kwargs.update(zip(positional, args))
            cache = pop_cache(kwargs)
            wanted = use_cache if use_cache is not None else self.config.use_cache
            made = cache is None and (wanted or self._kvx_needs_cache)
            if made:
                cache = make_cache(self.config)
            call = dict(kwargs, input_ids=input_ids, use_cache=use_cache, **{name: cache})

            def step(**kw):
                return base_cls.forward(self, **kw)

            for hook in self._kvx_forward_hooks:
                step = partial(hook.forward, self, step)
            out = step(**call)
            if made and not wanted:  # a cache only the layers needed: not handed back
                for field in (NEW_CACHE_ARG, OLD_CACHE_ARG):
                    if field in getattr(type(out), "__dataclass_fields__", {}):
                        setattr(out, field, None)
                        # out of its keys too: generate (5.20) takes a key for a cache, beam search reorders None
                        if field in out.keys():
                            OrderedDict.__delitem__(out, field)
            return out

        def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
            user_cache = model_kwargs.get(name)
            out = base_cls._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
            if user_cache is None and model_kwargs.get(name) is not None:
                model_kwargs[name] = make_cache(self.config)
            return out

        def save_pretrained(self, save_directory, *args, **kwargs):
            base_cls.save_pretrained(self, save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                write_checkpoint_files(save_directory)

        _CLASS_CACHE[base_cls] = type(
            "Kvx" + base_cls.__name__,
            (base_cls,),
            {
                "__init__": __init__,
                "forward": forward,
                "_prepare_cache_for_generation": _prepare_cache_for_generation,
                "save_pretrained": save_pretrained,
                "_kvx_base": base_cls,
                "__module__": __name__,
            },
        )
    return _CLASS_CACHE[base_cls]


class KvxForCausalLM(PreTrainedModel):
    """Entry point named in ``auto_map``: dispatches to the family class with kvx's layers."""

    config_class = KvxConfig

    def __new__(cls, config, *args, **kwargs):
        config = base_config(config)
        return kvx_class_for(config)(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        config = load_config(pretrained_model_name_or_path) if config is None else base_config(config)
        kwargs.pop("trust_remote_code", None)
        return kvx_class_for(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        config = base_config(config)
        kwargs.pop("trust_remote_code", None)
        return kvx_class_for(config)(config, **kwargs)

    _from_config = from_config
