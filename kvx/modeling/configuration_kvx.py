"""The config of a kvx checkpoint: its own ``model_type`` (``kvx``), so that transformers never
builds the plain base model from it by accident.

``config.json`` holds the base model's config fields flat, ``base_model_type`` (``llama``,
``qwen2``, ...) and the per-layer plan under ``kvx``. Without ``trust_remote_code``
transformers refuses it with its standard message; with it, ``KvxConfig`` is read and the
runtime turns it back into the base family's own config class before building the model.
Checkpoints written before kvx had its own model_type (``model_type`` = the base family,
plus ``kvx``) are read as they are.

Shipped inside every checkpoint; imports only transformers.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

KVX_CONFIG_KEY = "kvx"
MODEL_TYPE = "kvx"
AUTO_MAP = {"AutoConfig": "configuration_kvx.KvxConfig", "AutoModelForCausalLM": "modeling_kvx.KvxForCausalLM"}
_OWN_KEYS = ("model_type", "base_model_type", "auto_map", "architectures", "transformers_version")


class KvxConfig(PretrainedConfig):
    """A base model's config fields plus ``base_model_type`` and the ``kvx`` plan."""

    model_type = MODEL_TYPE

    def __init__(self, base_model_type: str = "", **kwargs):
        self.base_model_type = base_model_type
        super().__init__(**kwargs)


def base_config(config):
    """The base family's own config class (``LlamaConfig``, ...) carrying the ``kvx`` plan."""
    if getattr(config, "model_type", None) != MODEL_TYPE:
        return config  # already a base config (older checkpoints, configs built by kvx)
    return base_config_from_dict(config.to_dict())


def base_config_from_dict(d: dict):
    """A base config from a ``config.json`` dict of either format."""
    if d.get("model_type") != MODEL_TYPE:
        return CONFIG_MAPPING[d["model_type"]].from_dict(d)
    fields = {k: v for k, v in d.items() if k not in _OWN_KEYS}
    if d.get("base_model_type") not in CONFIG_MAPPING:
        raise ValueError(
            f"this kvx checkpoint's base model type {d.get('base_model_type')!r} is unknown to this transformers"
        )
    return CONFIG_MAPPING[d["base_model_type"]].from_dict(fields)


def kvx_config_dict(base: dict) -> dict:
    """A base config's ``config.json`` dict as a kvx checkpoint's: own model_type, auto_map."""
    d = {k: v for k, v in base.items() if k not in _OWN_KEYS}
    return {
        "model_type": MODEL_TYPE,
        "base_model_type": base["model_type"] if base.get("model_type") != MODEL_TYPE else base["base_model_type"],
        "architectures": ["KvxForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        **d,
        "transformers_version": base.get("transformers_version"),
    }


def load_config(path: str | Path):
    """The base config of a kvx checkpoint (either format, local or Hub), without remote code."""
    d, _ = PretrainedConfig.get_config_dict(str(path))
    return base_config_from_dict(d)
