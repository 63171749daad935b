"""The house rules, read from the code's own imports: the runtime imports nothing of kvx; methods
import no stage; stages do not import each other; and only the method registry and the
methods themselves name a method."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

KVX = Path(__file__).parent.parent / "kvx"
STAGES = ("profile", "convert", "distill", "eval")
ABOVE = ("cli", "recipe")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, 0) for ``import x`` / ``from x import``; relative ones resolved against kvx."""
    package = ".".join(("kvx",) + path.relative_to(KVX).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append((".".join(base + ([node.module] if node.module else [])), node.level))
            else:
                out.append((node.module, 0))
    return out


def _files(*parts: str) -> list[Path]:
    where = KVX.joinpath(*parts)
    return sorted(where.rglob("*.py")) if where.is_dir() else [where.with_suffix(".py")]


@pytest.mark.parametrize("path", _files("modeling"), ids=lambda p: p.name)
def test_runtime_imports_only_torch_transformers_and_its_siblings(path):
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "__future__"}
    for module, level in _imports(path):
        if level:
            assert level == 1 and module.startswith("kvx.modeling"), f"{path.name}: {module}"
        else:
            assert module.split(".")[0] in allowed, f"{path.name} imports {module}"


@pytest.mark.parametrize(
    ("where", "forbidden"),
    [
        ("methods", STAGES + ABOVE + ("export", "hub")),
        ("profile", ("convert", "distill", "eval") + ABOVE),
        ("convert", ("profile", "distill", "eval") + ABOVE),
        ("distill", ("profile", "convert", "eval") + ABOVE),
        ("eval", ("profile", "convert", "distill") + ABOVE),
        ("measure", STAGES + ABOVE + ("methods",)),
        ("arch", STAGES + ABOVE + ("methods",)),
        ("layerwise", STAGES + ABOVE + ("methods",)),
        ("plan", STAGES + ABOVE + ("methods", "arch")),
    ],
)
def test_no_module_imports_a_layer_above_it(where, forbidden):
    for path in _files(where):
        for module, _ in _imports(path):
            parts = module.split(".")
            assert not (parts[0] == "kvx" and len(parts) > 1 and parts[1] in forbidden), f"{path} imports {module}"


@pytest.mark.parametrize(
    "path",
    _files("plan")
    + _files("convert")
    + _files("distill")
    + _files("eval")
    + _files("measure")
    + _files("layerwise")
    + _files("hub")
    + _files("cli")
    + _files("recipe")
    + _files("checkpoint"),
    ids=lambda p: p.name,
)
def test_stages_do_not_name_a_method(path):
    """Stages ask the registry; they never branch on a kind or build a method's spec themselves."""
    from kvx.methods import METHODS

    kinds = set(METHODS) - {"full"}
    specs = {"MLASpec", "StreamingSpec", "MLAAttention", "StreamingAttention"}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in kinds, f"{path.name}:{node.lineno} names the kind {node.value!r}"
        if isinstance(node, ast.Name) and path.name != "plan.py":  # plan.py re-exports the spec classes
            assert node.id not in specs, f"{path.name}:{node.lineno} uses {node.id}"
