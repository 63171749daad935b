"""kvx push: the upload plan and model card are decided offline; network failures are one clear line."""

from __future__ import annotations

import json

import pytest
import yaml

from kvx.convert import convert
from kvx.errors import KvxError
from kvx.hub import execute, upload_plan

from .test_mla import SMALL


@pytest.fixture
def run_dir(tiny_dir, tmp_path):
    """A converted tiny model laid out like `kvx run` leaves it (eval.json beside the checkpoint)."""
    ckpt = tmp_path / "run" / "converted"
    convert(str(tiny_dir("llama")), ckpt, kv_rank=24, rope_dims=8, **SMALL)
    rows = {
        "original": {"ppl": 10.0, "kv_bytes_per_token": 1536.0},
        "converted": {"ppl": 12.5, "kv_bytes_per_token": 384.0},
    }
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"recipe": "t", "data": "bundled", "rows": rows}))
    (ckpt / "checkpoints" / "step-1").mkdir(parents=True)  # training state: stays local
    (ckpt / "checkpoints" / "step-1" / "optimizer.bin").write_bytes(b"x")
    return ckpt


def test_upload_plan_and_card(run_dir):
    plan = upload_plan(run_dir, "me/tiny-mla", private=True, revision="v1")
    assert (plan.repo_id, plan.private, plan.revision) == ("me/tiny-mla", True, "v1")
    on_disk = {p.name for p in run_dir.iterdir() if p.is_file()}
    assert set(plan.files) == on_disk - {"README.md"}  # README is regenerated; checkpoints/ is not sent
    assert "modeling_kvx.py" in plan.files and "config.json" in plan.files
    assert not any(f.startswith("checkpoints") for f in plan.files)
    assert plan.commit_message == "kvx push: 3 layers: 3 mla(kv_rank=24, rope_dims=8)"

    head, body = plan.card.split("\n---\n", 1)
    meta = yaml.safe_load(head.removeprefix("---\n"))
    config = json.loads((run_dir / "config.json").read_text())
    assert meta["base_model"] == config["kvx"]["base_model"]
    assert {"kvx", "mla"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert "| converted | 12.500 | 384 | 4.00x |" in body  # the eval table beside the original
    assert 'from_pretrained("me/tiny-mla", trust_remote_code=True)' in body
    assert "kv_rank: 24" in body  # the plan


def test_upload_plan_refusals(run_dir, tmp_path):
    with pytest.raises(KvxError, match="USER/NAME"):
        upload_plan(run_dir, "no-slash")
    with pytest.raises(KvxError, match="no config.json"):
        upload_plan(tmp_path, "me/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(KvxError, match="no .safetensors"):
        upload_plan(empty, "me/x")


def test_push_offline_errors_are_clear(run_dir, monkeypatch):
    plan = upload_plan(run_dir, "me/tiny-mla")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvxError, match="HF_HUB_OFFLINE"):
        execute(plan)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(KvxError, match="could not reach the Hub"):
        execute(plan)
