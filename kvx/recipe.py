"""Recipes: one YAML file that names a whole kvx pipeline, so a result can be repeated and shared.

``kvx run RECIPE -o DIR`` runs profile -> convert -> distill -> eval and leaves each stage's
output in DIR (``profile/``, ``converted/``, ``healed/``, ``eval.json``). Every stage writes
atomically, so "its output exists" means "it finished"; a re-run skips finished stages and a
distillation cut short continues from its last checkpoint. Recipes are checked completely
before any work: unknown keys, wrong types and impossible combinations are errors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from .errors import KvxError
from .loading import DEFAULT_MODEL


@dataclass(frozen=True)
class ProfileStage:
    """``kvx profile``; with ``convert.plan: profile`` its suggested plan is what gets converted."""

    tokens: int = 8192
    seq_len: int = 1024
    target_kv_ratio: float = 4.0
    rope_dims: int | None = None
    streaming: bool = False
    lazy_threshold: float = 0.9  # a layer this lazy (or lazier) may become streaming
    sink: int = 4
    window: int | None = None


@dataclass(frozen=True)
class ConvertStage:
    """``kvx convert``. ``plan``: a plan file, or ``profile`` for the profile stage's suggestion."""

    to: str = "mla"
    kv_rank: int | str = "full"
    rope_dims: int | str = "all"
    rope_select: str | None = None
    layout: str = "kvx"
    layers: str | None = None
    plan: str | None = None
    calib: str = "bundled"
    calib_tokens: int = 16384
    sink: int = 4
    window: int = 1020


@dataclass(frozen=True)
class DistillStage:
    """``kvx distill`` (the teacher defaults to the recipe's model)."""

    tokens: int = 262_144
    data: str = "bundled"
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    temperature: float = 1.0
    loss: str = "kl"
    train: str = "converted"
    eval_every: int = 0
    save_every: int = 16
    mixed_precision: str = "no"
    lora_rank: int = 8
    seed: int = 0
    teacher: str | None = None


@dataclass(frozen=True)
class EvalStage:
    """``kvx eval`` of the original, the converted and the healed model on the same windows."""

    data: str = "bundled"
    max_tokens: int = 8192
    seq_len: int = 512
    long: list[int] | None = None
    long_tail: int = 1024
    long_docs: int = 4


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str = DEFAULT_MODEL
    description: str = ""
    profile: ProfileStage | None = None
    convert: ConvertStage = field(default_factory=ConvertStage)
    distill: DistillStage | None = None
    eval: EvalStage = field(default_factory=EvalStage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- strict parsing


def _accepts(hint, value) -> bool:
    """Does ``value`` (parsed YAML) fit the type ``hint`` of a recipe field?"""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls, data, where: str):
    """``cls(**data)`` with every key known and every value of the declared type."""
    if not isinstance(data, dict):
        raise KvxError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise KvxError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        stage = next((h for h in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(h)), None)
        if stage is not None and value is not None:
            kwargs[key] = _build(stage, value, f"{where}.{key}")
        elif not _accepts(hint, value):
            raise KvxError(f"{where}.{key}: {value!r} is not {_type_name(hint)}")
        else:
            kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise KvxError(f"{where}: missing {', '.join(missing)}")
    return cls(**kwargs)


def _check(recipe: Recipe, where: str) -> None:
    """What the types cannot say: stage combinations and choices."""
    c = recipe.convert
    if c.to not in ("mla", "streaming"):
        raise KvxError(f"{where}.convert.to: {c.to!r} (choose mla or streaming)")
    if c.plan == "profile" and recipe.profile is None:
        raise KvxError(f"{where}: convert.plan is 'profile' but the recipe has no profile stage")
    if recipe.distill is not None and recipe.distill.tokens < recipe.distill.batch_size * recipe.distill.seq_len:
        raise KvxError(f"{where}.distill.tokens: fewer than one batch ({recipe.distill.batch_size} x {recipe.distill.seq_len})")


def builtin_dir() -> Path:
    return Path(str(resources.files("kvx") / "recipes"))


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped with kvx, by name."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def load_recipe(ref: str | Path) -> Recipe:
    """A recipe from a YAML file or a built-in recipe's name; every error names the file and key."""
    path = Path(ref)
    if not path.is_file():
        shipped = builtin_recipes()
        if str(ref) not in shipped:
            raise KvxError(f"recipe {ref!r} not found: not a file, nor a built-in recipe ({', '.join(shipped)})")
        path = shipped[str(ref)]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KvxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    recipe = _build(Recipe, data, path.name)
    _check(recipe, path.name)
    if isinstance(recipe.convert.plan, str) and recipe.convert.plan != "profile":  # relative to the recipe
        plan_path = (path.parent / recipe.convert.plan).resolve()
        if not plan_path.is_file():
            raise KvxError(f"{path.name}.convert.plan: plan file {plan_path} not found")
        recipe = dataclasses.replace(recipe, convert=dataclasses.replace(recipe.convert, plan=str(plan_path)))
    return recipe


# --------------------------------------------------------------------------- running


def _stage(name: str, done: bool, say: Callable[[str], None]) -> bool:
    say(f"[{name}] {'already complete, skipped' if done else 'running'}")
    return not done


def run_recipe(recipe: Recipe, out: str | Path, progress=None, say: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Run every stage of ``recipe`` into ``out``, skipping finished ones; returns eval.json's content."""
    from . import pipeline

    kw = {"progress": progress} if progress else {}
    out = Path(out)
    stamp = out / "recipe.json"
    if overwrite and out.exists():
        if not stamp.exists() and any(out.iterdir()):  # never wipe a folder kvx run did not make
            raise KvxError(f"--overwrite: {out} is not a kvx run folder (no recipe.json); remove it yourself or pick another -o")
        shutil.rmtree(out)
    if stamp.exists() and json.loads(stamp.read_text()) != json.loads(json.dumps(recipe.to_dict())):
        raise KvxError(f"{out} holds the stages of another recipe (see {stamp}): use a new -o folder or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe.to_dict(), indent=2))

    p = recipe.profile
    if p is not None and _stage("profile", (out / "profile" / "report.json").exists(), say):
        pipeline.profile(
            recipe.model, out / "profile", tokens=p.tokens, seq_len=p.seq_len, target_kv_ratio=p.target_kv_ratio,
            rope_dims=p.rope_dims, streaming=p.streaming, lazy_threshold=p.lazy_threshold, sink=p.sink, window=p.window,
            overwrite=True, **kw,
        )

    c, converted = recipe.convert, out / "converted"
    if _stage("convert", (converted / "config.json").exists(), say):
        plan = str(out / "profile" / "plan.yaml") if c.plan == "profile" else c.plan
        if c.to == "streaming" and plan is None:
            pipeline.convert_to_streaming(recipe.model, converted, c.layers or "auto", c.sink, c.window, overwrite=True, **kw)
        else:
            pipeline.convert_to_mla(
                recipe.model, converted, kv_rank=c.kv_rank, rope_dims=c.rope_dims, rope_select=c.rope_select,
                layout=c.layout, layers=c.layers, plan=plan, calib=c.calib, calib_tokens=c.calib_tokens, overwrite=True, **kw,
            )

    final, d = converted, recipe.distill
    if d is not None:
        final = out / "healed"
        if _stage("distill", (final / "distill_summary.json").exists(), say):
            resume = (final / "checkpoints").is_dir() and any((final / "checkpoints").glob("step-*/trainer_state.json"))
            if resume:
                say("[distill] continuing from its last checkpoint")
            pipeline.distill(
                str(converted), final, teacher=d.teacher or recipe.model, data=d.data, tokens=d.tokens, seq_len=d.seq_len,
                batch_size=d.batch_size, grad_accum=d.grad_accum, lr=d.lr, temperature=d.temperature, loss=d.loss,
                train=d.train, eval_every=d.eval_every, save_every=d.save_every, mixed_precision=d.mixed_precision,
                lora_rank=d.lora_rank, seed=d.seed, resume=resume, overwrite=not resume, **kw,
            )

    e, eval_path = recipe.eval, out / "eval.json"
    if _stage("eval", eval_path.exists(), say):
        rows = {}
        models = [("original", recipe.model), ("converted", str(converted))] + ([("healed", str(final))] if d else [])
        for label, ref in models:
            result = pipeline.evaluate(ref, None, e.data, e.max_tokens, e.seq_len, e.long, e.long_tail, e.long_docs, **kw)
            rows[label] = {**result["model"], "name": ref}
        tmp = eval_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"recipe": recipe.name, "data": e.data, "rows": rows}, indent=2))
        tmp.replace(eval_path)
    return json.loads(eval_path.read_text())
