"""Plan round-trips and byte arithmetic; data sources; model resolution errors."""

from __future__ import annotations

import pytest

from kvx.data import load_text, token_windows
from kvx.errors import KvxError
from kvx.loading import resolve
from kvx.plan import CacheGeometry, FullSpec, MLASpec, Plan, parse_layers


def _plan():
    return Plan(
        [FullSpec(), MLASpec(60, 36), MLASpec(30, 18, "high")], "some/base", {"conversion": {"calib": "bundled"}}
    )


def test_plan_yaml_round_trip(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.yaml"
    plan.to_yaml(path)
    again = Plan.load(path)
    assert again.layers == plan.layers and again.base_model == "some/base" and again.meta == plan.meta
    assert Plan.from_yaml(plan.to_yaml()).layers == plan.layers


def test_plan_config_round_trip(tiny_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir("llama"))
    assert Plan.from_config(config).layers == [FullSpec()] * 3
    config.kvx = {**_plan().to_dict(), "k_norm_eps": None}
    assert Plan.from_config(config).layers == _plan().layers


def test_bad_plans_are_clear_errors():
    with pytest.raises(KvxError, match="unknown layer spec kind 'lckv'"):
        Plan.from_dict({"layers": [{"kind": "lckv"}]})
    with pytest.raises(KvxError, match="bad mla spec"):
        Plan.from_dict({"layers": [{"kind": "mla", "kv_rank": 3}]})
    with pytest.raises(KvxError, match="needs a 'layers' list"):
        Plan.from_dict({})
    with pytest.raises(KvxError, match="plan file not found"):
        Plan.load("no/such/plan.yaml")


def test_kv_bytes_follow_the_specs():
    geom = CacheGeometry(n_kv_heads=3, head_dim=64)
    plan = _plan()
    # full: 2*3*64 = 384 floats; mla: 60+36 = 96; 30+18 = 48
    assert plan.kv_bytes(geom, 10, 4) == (384 + 96 + 48) * 10 * 4
    normed = CacheGeometry(n_kv_heads=3, head_dim=64, k_norm=True)
    assert MLASpec(60, 36).cached_floats(normed) == 99  # one 1/rms per KV head
    sliding = CacheGeometry(3, 64, False, 8, ("sliding_attention", "full_attention", "full_attention"))
    assert plan.kv_bytes(sliding, 100, 2) == (384 * 7 + 96 * 100 + 48 * 100) * 2


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    assert parse_layers("-1", 4) == [3]
    for bad in ("9", "a", "1-9"):
        with pytest.raises(KvxError):
            parse_layers(bad, 4)


def test_bundled_corpus_has_disjoint_calibration_and_evaluation_parts(tokenizer):
    calib, evaluation = load_text("bundled", "calib"), load_text("bundled", "eval")
    assert calib.startswith("In the beginning God created")
    assert "Jesus" in evaluation and "Jesus" not in calib
    n_calib = len(tokenizer(calib[:2_000_000])["input_ids"])
    assert n_calib > 200_000
    assert token_windows(tokenizer, "bundled", "eval", 1000, 100).shape == (10, 100)


def test_local_text_file_and_folder(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 200)
    (tmp_path / "b.md").write_text("delta epsilon " * 200)
    assert "delta" in load_text(str(tmp_path)) and "alpha" in load_text(str(tmp_path / "a.txt"))
    assert token_windows(tokenizer, str(tmp_path / "a.txt"), "eval", 64, 32).shape == (2, 32)
    with pytest.raises(KvxError, match="fewer than one window"):
        token_windows(tokenizer, str(tmp_path / "a.txt"), "eval", 100_000, 50_000)
    with pytest.raises(KvxError, match="data not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_hub_data_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvxError, match="HF_HUB_OFFLINE"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


def test_resolve_models(tmp_path, smollm2_dir):
    assert resolve("smollm2-135m") == (smollm2_dir, "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(KvxError, match="not found"):
        resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvxError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_wiki_is_a_second_evaluation_text_never_calibration():
    from kvx.data import load_documents

    docs = load_documents("wiki", "eval")
    assert len(docs) == 12 and sum(map(len, docs)) > 4_000_000
    assert "Bible" not in docs[0][:2000] and "thee" not in docs[0][:2000]
    with pytest.raises(KvxError, match="evaluation text only"):
        load_documents("wiki", "calib")


def test_text_the_model_writes_is_sampled_in_batches_cached_and_calibrates(tiny_dir, tokenizer, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import kvx
    from kvx.convert import convert
    from kvx.generate import BATCH, SEED_PROMPTS, generated_windows, text_windows

    monkeypatch.setenv("KVX_CACHE", str(tmp_path / "cache"))
    src = tiny_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    n = BATCH + 3  # two batches, the second a short one
    windows = generated_windows(model, tokenizer, n * 32, 32, cache_key=str(src))
    assert windows.shape == (n, 32) and windows.dtype == torch.long
    for i in (0, BATCH + 2):  # each window starts with its own opening, unpadded
        opening = tokenizer(SEED_PROMPTS[i % len(SEED_PROMPTS)], add_special_tokens=False).input_ids
        assert windows[i, : len(opening)].tolist() == opening

    def must_not_load():
        raise AssertionError("cached text must not load the model")

    assert torch.equal(generated_windows(must_not_load, tokenizer, n * 32, 32, cache_key=str(src)), windows)
    assert torch.equal(generated_windows(must_not_load, tokenizer, 5 * 32, 32, cache_key=str(src)), windows[:5])
    longer = generated_windows(model, tokenizer, (2 * BATCH + 1) * 32, 32, cache_key=str(src))
    assert longer.shape[0] == 2 * BATCH + 1 and torch.equal(longer[:n], windows)  # extended, not resampled
    mixed = text_windows(must_not_load, tokenizer, "teacher+bundled", 8 * 32, 32, cache_key=str(src))
    assert torch.equal(mixed[0::2], windows[:4]) and torch.equal(
        mixed[1::2], token_windows(tokenizer, "bundled", "calib", 4 * 32, 32)
    )
    with pytest.raises(KvxError, match="calibration and training data"):
        token_windows(tokenizer, "teacher+bundled", "eval", 256, 32)
    out = tmp_path / "mla"
    convert(str(src), out, kv_rank=4, rope_dims=4, calib="teacher", calib_tokens=256, calib_seq_len=64)
    assert kvx.load(str(out)).config.kvx["conversion"]["calib"] == "teacher"
