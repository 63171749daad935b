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
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .checkpoint import writes_output
from .config import accepts, type_name
from .convert.config import ConvertConfig
from .distill.config import DistillConfig
from .errors import KvxError
from .eval.config import EvalConfig
from .io.staging import pause_point
from .loading import DEFAULT_MODEL
from .profile.config import ProfileConfig


@dataclass(frozen=True)
class Recipe:
    """A model and the stages' own configs (``convert.plan: profile`` converts the profile's plan;
    ``distill.teacher`` defaults to the recipe's model)."""

    name: str
    model: str = DEFAULT_MODEL
    description: str = ""
    profile: ProfileConfig | None = None
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    distill: DistillConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- strict parsing


def _build(cls, data, where: str):
    """``cls(**data)`` with every key known and every value of the declared type."""
    if not isinstance(data, dict):
        raise KvxError(f"{where}: expected a mapping, got {type(data).__name__}")
    if hasattr(cls, "from_mapping"):  # a config with keys of its own beyond its fields
        return cls.from_mapping(data, where)
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
        elif not accepts(hint, value):
            raise KvxError(f"{where}.{key}: {value!r} is not {type_name(hint)}")
        else:
            kwargs[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise KvxError(f"{where}: missing {', '.join(missing)}")
    return cls(**kwargs)


def _check(recipe: Recipe, where: str) -> None:
    """What the types cannot say: stage combinations and choices."""
    if recipe.convert.plan == "profile" and recipe.profile is None:
        raise KvxError(f"{where}: convert.plan is 'profile' but the recipe has no profile stage")
    if recipe.distill is not None:
        try:
            recipe.distill.check()
        except KvxError as e:
            raise KvxError(f"{where}.distill: {e}") from None


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


@writes_output  # each stage locks its own folder too; this lock guards the run folder's stamp
def run_recipe(
    recipe: Recipe, out: str | Path, progress=None, say: Callable[[str], None] = print, overwrite: bool = False
) -> dict:
    """Run every stage of ``recipe`` into ``out``, skipping finished ones; returns eval.json's content."""
    from .convert.run import convert
    from .distill.run import distill
    from .eval.run import evaluate
    from .profile.run import profile

    kw = {"progress": progress} if progress else {}
    out = Path(out)
    stamp = out / "recipe.json"
    if overwrite and out.exists():
        if not stamp.exists() and any(out.iterdir()):  # never wipe a folder kvx run did not make
            raise KvxError(
                f"--overwrite: {out} is not a kvx run folder (no recipe.json); remove it yourself or pick another -o"
            )
        shutil.rmtree(out)
    if stamp.exists() and json.loads(stamp.read_text()) != json.loads(json.dumps(recipe.to_dict())):
        raise KvxError(f"{out} holds the stages of another recipe (see {stamp}): use a new -o folder or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    written = out / ".recipe.json.tmp"
    written.write_text(json.dumps(recipe.to_dict(), indent=2))
    written.replace(stamp)

    if recipe.profile is not None and _stage("profile", (out / "profile" / "report.json").exists(), say):
        profile(recipe.model, out / "profile", recipe.profile, overwrite=True, **kw)

    c, converted = recipe.convert, out / "converted"
    if _stage("convert", (converted / "config.json").exists(), say):
        if c.plan == "profile":
            c = dataclasses.replace(c, plan=str(out / "profile" / "plan.yaml"))
        convert(recipe.model, converted, c, overwrite=True, **kw)
    pause_point("run-after-convert")

    final, d = converted, recipe.distill
    if d is not None:
        final = out / "healed"
        if _stage("distill", (final / "distill_summary.json").exists(), say):
            resume = (final / "checkpoints").is_dir() and any((final / "checkpoints").glob("step-*/trainer_state.json"))
            if resume:
                say("[distill] continuing from its last checkpoint")
            d = dataclasses.replace(d, teacher=d.teacher or recipe.model)
            distill(str(converted), final, d, resume=resume, overwrite=not resume, **kw)

    e, eval_path = recipe.eval, out / "eval.json"
    if _stage("eval", eval_path.exists(), say):
        rows = {}
        models = [("original", recipe.model), ("converted", str(converted))] + ([("healed", str(final))] if d else [])
        for label, ref in models:
            result = evaluate(ref, None, e, **kw)
            rows[label] = {**result["model"], "name": ref}
        tmp = eval_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"recipe": recipe.name, "data": e.data, "rows": rows}, indent=2))
        tmp.replace(eval_path)
    return json.loads(eval_path.read_text())
