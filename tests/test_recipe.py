"""Recipes: strict validation up front, whole pipeline into one folder, finished stages skipped."""

from __future__ import annotations

import json

import pytest
import yaml

from kvx.errors import KvxError
from kvx.recipe import builtin_recipes, load_recipe, run_recipe


def test_builtin_recipes_are_valid():
    names = set(builtin_recipes())
    assert {"smollm2-mla-4x", "smollm2-hybrid", "smollm2-condensed-2x", "llama-3.2-1b-mla"} <= names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description


@pytest.mark.parametrize(
    "body, message",
    [
        ({"name": "x", "convert": {"kv_rnk": 8}}, r"convert: unknown key\(s\) kv_rnk"),
        ({"name": "x", "colour": "red"}, r"unknown key\(s\) colour"),
        ({"name": "x", "distill": {"tokens": "many"}}, r"distill.tokens: 'many' is not int"),
        ({"name": "x", "eval": {"long": [2048, "x"]}}, r"eval.long"),
        ({"name": "x", "convert": {"plan": "profile"}}, "no profile stage"),
        ({"name": "x", "convert": {"plan": "missing.yaml"}}, "plan file .* not found"),
        (
            {"name": "x", "convert": {"to": "lckv"}},
            r"convert: --to 'lckv' is not implemented yet \(available: mla, streaming",
        ),
        ({"name": "x", "convert": {"to": "mla", "sink": 4}}, "--sink is an option of streaming, not of --to mla"),
        ({"name": "x", "convert": {"to": "mla(kv_rank=8", "sink": 4}}, "bad spec"),
        ({"name": "x", "distill": {"tokens": 10}}, "less than one optimizer step"),
        ({"model": "m"}, "missing name"),
        (["a list"], "expected a mapping"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, body, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(KvxError, match=message):
        load_recipe(path)


def test_unknown_recipe_names_the_builtins():
    with pytest.raises(KvxError, match="smollm2-mla-4x"):
        load_recipe("no-such-recipe")


def test_run_recipe_end_to_end_and_resume(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    body = {
        "name": "tiny",
        "model": str(src),
        "profile": {
            "tokens": 512,
            "seq_len": 128,
            "target_kv_ratio": 2.0,
            "streaming": True,
            "window": 32,
            "lazy_threshold": 0.0,
        },  # random weights are not lazy: let the laziest layer stream anyway
        "convert": {"plan": "profile", "calib_tokens": 1024},  # a window of each source of the mix
        "distill": {"tokens": 1024, "seq_len": 64, "batch_size": 4, "save_every": 1, "lr": 1e-3},
        "eval": {"max_tokens": 512, "seq_len": 128},
    }
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(body))
    recipe = load_recipe(recipe_path)
    out = tmp_path / "run"
    said: list[str] = []
    result = run_recipe(recipe, out, say=said.append)
    for stage in (
        "profile/report.json",
        "profile/plan.yaml",
        "converted/config.json",
        "healed/distill_summary.json",
        "eval.json",
    ):
        assert (out / stage).exists(), stage
    rows = result["rows"]
    assert set(rows) == {"original", "converted", "healed"}
    config = json.loads((out / "converted" / "config.json").read_text())
    assert {spec["kind"] for spec in config["kvx"]["layers"]} == {"mla", "streaming"}  # the profile's hybrid plan
    assert rows["converted"]["kv_bytes_per_token"] < rows["original"]["kv_bytes_per_token"]
    assert rows["healed"]["kv_bytes_per_token"] == rows["converted"]["kv_bytes_per_token"]
    assert all(m.endswith("running") for m in said)

    # a second run does nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "eval.json", out / "converted" / "config.json")}
    said.clear()
    assert run_recipe(recipe, out, say=said.append) == result
    assert all(m.endswith("skipped") for m in said) and len(said) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # a distillation cut short (final checkpoint not written yet) continues from its last step checkpoint
    summary = json.loads((out / "healed" / "distill_summary.json").read_text())
    for name in ("distill_summary.json", "config.json"):
        (out / "healed" / name).unlink()
    (out / "eval.json").unlink()
    said.clear()
    run_recipe(recipe, out, say=said.append)
    assert "[distill] continuing from its last checkpoint" in said
    assert json.loads((out / "healed" / "distill_summary.json").read_text())["steps"] == summary["steps"]

    # the folder belongs to this recipe
    body["distill"]["lr"] = 5e-4
    recipe_path.write_text(yaml.safe_dump(body))
    with pytest.raises(KvxError, match="another recipe"):
        run_recipe(load_recipe(recipe_path), out, say=said.append)


def test_overwrite_never_wipes_a_foreign_folder(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(KvxError, match="not a kvx run folder"):
        run_recipe(load_recipe("smollm2-mla-4x"), precious, say=lambda m: None, overwrite=True)
    assert (precious / "thesis.tex").exists()
