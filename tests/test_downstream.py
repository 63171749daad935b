"""Judging a model as its users do: downstream tasks through lm-eval, and generation agreement.

Tiny models and a tiny multiple-choice task written by the test (``dataset_path: json``); the
bridge's accuracy is checked against the model's own log-likelihoods computed here, so a
bridge that scored the wrong model, the wrong continuations or nothing at all would fail.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvx.convert import convert
from kvx.eval import evaluate
from kvx.eval.downstream import _manager, offline_tasks, task_specs
from kvx.loading import load_model

from .helpers import assert_one_line_error, kvx

SMALL = dict(calib_tokens=1024, calib_seq_len=128)
DOCS = [
    {"question": q, "choices": c, "answer": a}
    for q, c, a in [
        ("The sun rises in the", ["east", "west", "sea", "morning"], 0),
        ("Water freezes at zero degrees", ["Celsius", "Kelvin", "south"], 0),
        ("A week has seven", ["days", "years", "songs", "rivers"], 0),
        ("In the beginning God created the heaven and the", ["earth", "cheese", "night"], 0),
        ("The opposite of hot is", ["warm", "cold", "blue", "tall"], 1),
        ("Bees make", ["milk", "honey", "stone"], 1),
        ("Two plus two is", ["three", "five", "four", "none"], 2),
        ("The capital of France is", ["Rome", "Madrid", "Paris"], 2),
        ("Fish live in", ["trees", "water", "fire", "sand"], 1),
        ("At night the sky is", ["dark", "green", "loud"], 0),
        ("Snow is", ["black", "red", "white", "hot"], 2),
        ("A cat says", ["woof", "meow", "moo"], 1),
    ]
]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root / "tiny_mc.yaml"


@pytest.fixture(scope="module")
def lossless(tiny_dir_factory, tmp_path_factory):
    """A tiny llama and its lossless MLA conversion (full rank, all RoPE dims)."""
    src = tiny_dir_factory("llama")
    out = tmp_path_factory.mktemp("mla") / "mla"
    convert(str(src), out, kv_rank="full", rope_dims="all", **SMALL)
    return str(src), str(out)


def _own_accuracy(path: str) -> float:
    """Zero-shot multiple-choice accuracy from the model's log-likelihoods, computed here as
    lm-eval defines it: each choice after a space, its tokens scored given the question's."""
    model, tok, _ = load_model(path)
    right = 0
    with torch.no_grad():
        for d in DOCS:
            ctx = tok(d["question"], add_special_tokens=False).input_ids
            scores = []
            for choice in d["choices"]:
                whole = tok(d["question"] + " " + choice, add_special_tokens=False).input_ids
                cont = whole[len(ctx) :]
                logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
                scores.append(sum(logp[len(whole) - len(cont) - 1 + i, t].item() for i, t in enumerate(cont)))
            right += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    return right / len(DOCS)


def test_bridge_scores_a_lossless_conversion_as_the_original(lossless, task_file):
    src, out = lossless
    result = evaluate(out, src, tasks=[str(task_file)], prompts=0, max_tokens=256, seq_len=128)
    entry = result["tasks"]["tiny_mc"]
    model, base = entry["model"], entry["baseline"]
    assert model["n"] == base["n"] == len(DOCS)
    assert model["acc"] == base["acc"] == pytest.approx(_own_accuracy(src))
    assert model["acc_norm"] == base["acc_norm"]
    assert base["acc"] == 0 or entry["kept"]["acc"] == pytest.approx(1.0)


def test_limit_takes_the_same_first_examples(lossless, task_file):
    src, _ = lossless
    full = evaluate(src, None, tasks=[str(task_file)], prompts=0, max_tokens=256, seq_len=128)
    part = evaluate(src, None, tasks=[str(task_file)], limit=4, prompts=0, max_tokens=256, seq_len=128)
    assert part["tasks"]["tiny_mc"]["model"]["n"] == 4
    assert full["tasks"]["tiny_mc"]["model"]["n"] == len(DOCS)


def test_generation_agreement(lossless, tiny_dir):
    src, out = lossless
    same = evaluate(out, src, prompts=4, new_tokens=12, max_tokens=256, seq_len=128)["agreement"]
    assert same["agreement"] == 1.0 and same["exact_match"] == 1.0 and same["prompts"] == 4
    assert same["tokens_before_divergence"] == 12 and len(same["samples"]) == 3
    assert same["samples"][0]["model"] == same["samples"][0]["baseline"]
    other = str(tiny_dir("llama", seed=1))  # another random model: its own continuations
    moved = evaluate(other, src, prompts=4, new_tokens=12, max_tokens=256, seq_len=128)["agreement"]
    assert moved["agreement"] < 1.0


def test_generations_are_what_generate_writes(lossless):
    """The stored continuations are the model's greedy ``generate()`` output, token for token."""
    src, _ = lossless
    row = evaluate(src, None, prompts=2, new_tokens=8, max_tokens=256, seq_len=128)["model"]["generations"]
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for prompt, tokens in zip(row["prompts"], row["tokens"]):
        x = torch.tensor([prompt])
        out = model.generate(x, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        assert out[0, len(prompt) :].tolist() == tokens


def test_cli_tables_and_json(lossless, task_file):
    src, out = lossless
    args = ("eval", out, "--baseline", src, "--tasks", str(task_file), "--max-tokens", "256", "--seq-len", "128")
    proc = kvx(*args, "--prompts", "2", "--new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "tiny_mc" in proc.stdout and "greedy generation" in proc.stdout and "100.0%" in proc.stdout
    result = json.loads(kvx(*args, "--prompts", "0", "--json").stdout)
    assert set(result) == {"model", "baseline", "kv_ratio", "ppl_ratio", "tasks"}


def test_without_lm_eval_one_line(lossless, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "lm_eval.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    proc = kvx("eval", lossless[0], "--tasks", "arc_easy", env={"PYTHONPATH": str(shadow)})
    assert_one_line_error(proc, "lm-eval", "pip install")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
        (["--tasks", "missing.yaml"], "does not exist"),
        (["--tasks", "piqa", "--limit", "0"], "--limit 0 must be at least 1"),
        (["--new-tokens", "0"], "--new-tokens 0 must be at least 1"),
    ],
)
def test_bad_options_refused_before_loading(tmp_path, args, fragment):
    proc = kvx("eval", str(tmp_path / "no-model-here"), *args)
    assert_one_line_error(proc, fragment)


def test_offline_tasks_resolve_to_packaged_data():
    """Every task in kvx's table builds in lm-eval from the packaged split: all its rows load,
    and each example's target is one of its choices (a schema mismatch fails here)."""
    manager = _manager()
    for name, entry in offline_tasks().items():
        specs, members = task_specs([name], manager)
        assert len(specs) == len(members[name]) >= 1
        for spec in specs[:2]:  # a group's first subtasks stand for the rest
            task = manager.load([spec])["tasks"][spec["task"]]
            docs = list(task.eval_docs)
            split = entry["split"]
            files = spec["dataset_kwargs"]["data_files"][split]
            assert len(docs) == len(datasets.load_dataset("arrow", data_files={split: files}, split=split))
            for doc in docs[:5]:
                # the gold index: the target's, or the text's where the choices are contexts (winogrande)
                gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
                choices = task.doc_to_choice(doc)
                assert isinstance(gold, int) and 0 <= gold < len(choices) > 1, (name, gold, choices)


def test_model_card_carries_tasks_and_agreement(lossless, task_file):
    """A kvx run folder's eval.json rows (original first) become the card's tables."""
    from pathlib import Path

    from kvx.hub import hub_card

    src, out = lossless
    opts = dict(tasks=[str(task_file)], prompts=2, new_tokens=6, max_tokens=256, seq_len=128)
    rows = {"original": evaluate(src, None, **opts)["model"], "converted": evaluate(out, None, **opts)["model"]}
    (Path(out).parent / "eval.json").write_text(json.dumps({"data": "bundled", "rows": rows}))
    card = hub_card(Path(out))
    acc = rows["original"]["tasks"]["tiny_mc"]["acc_norm"]
    assert f"| tiny_mc | acc_norm | {len(DOCS)} | {acc:.3f}" in card
    assert "| converted | 2 | 6 | 100.0% | 100.0% | 6.0 |" in card
