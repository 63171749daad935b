"""Shared fixtures: tiny random models of every supported family, and the bundled SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from kvx.loading import resolve

# Real tokenizer (SmolLM2's) so the whole pipeline, data included, runs on tiny models.
VOCAB = 49152
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**_COMMON),  # per-head q/k RMS norm
    "gemma3": lambda: Gemma3TextConfig(  # (1+w) q/k norms, sandwich norms, local sliding layers, MQA
        **{**_COMMON, "num_key_value_heads": 1},
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
    ),
}
FAMILIES = list(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0):
    """A tiny random model; every parameter (norm gains and biases too) is perturbed so that
    nothing sits at a special value (ones, zeros) that could hide a folding mistake."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The bundled SmolLM2-135M-Instruct as a safetensors folder (dequantised once, cached)."""
    return resolve("smollm2-135m")[0]


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _tiny_dir_maker(root, tokenizer):
    def make(family: str, seed: int = 0):
        path = root / f"tiny-{family}"
        tiny_model(family, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """Save a tiny model of a family (with the real tokenizer) as a local HF folder."""
    return _tiny_dir_maker(tmp_path, tokenizer)


@pytest.fixture(scope="session")
def tiny_dir_factory(tmp_path_factory, tokenizer):
    """``tiny_dir`` for module- and session-scoped fixtures."""
    return _tiny_dir_maker(tmp_path_factory.mktemp("tiny"), tokenizer)
