"""The package's shape (docs/architecture.md): layers import only downwards, and no module imports another
that imports it back; no code outside the task modules branches on a task's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "scinfl"

# Package (or module) -> layer; a module may import its own package and the layers below its own.
LAYERS = {
    "_settings": 0,
    "key": 0,
    "nn": 0,
    "data": 0,
    "train": 1,
    "tasks": 2,
    "federation": 3,
    "privacy": 4,  # attacks what the federation's rounds send, with its own code
    "model": 4,
    "pp": 5,
    "tl": 5,
    "pl": 5,
    "flower_apps": 5,
    "deployment": 6,  # the tooling of a deployment on one machine (CLI, tests, benchmarks)
    "__init__": 6,
    "_version": 0,
    "_warnings": -1,  # imports nothing of scinfl: every layer may warn
    "demo": 6,
    "cli": 7,
    "__main__": 8,
}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(SOURCE).with_suffix("").parts): path
        for path in sorted(SOURCE.rglob("*.py"))
    }


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The scinfl modules ``name`` imports (relative imports resolved), as dotted names under scinfl."""
    package = name.split(".")[:-1]  # a package's __init__ is named "<package>.__init__"
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("scinfl"):
                target = node.module.removeprefix("scinfl").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import data` imports a module
                found.add(f"{target}.{alias.name}".strip(".") if not node.module else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scinfl."):
                    found.add(alias.name.removeprefix("scinfl."))
    return {f for f in found if f}


def _resolve(target: str, modules) -> str:
    """A dotted target as the module it names (``from . import __version__`` names the package)."""
    while target and target not in modules and f"{target}.__init__" not in modules:
        target = target.rpartition(".")[0]
    return target or "__init__"


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_layers_import_only_downwards():
    wrong = []
    modules = _modules()
    for name, path in modules.items():
        own = name.split(".")[0]
        for target in {_resolve(t, modules) for t in _imports(name, path, top_level_only=False)}:
            other = target.split(".")[0]
            if other == own:
                continue
            if _layer(target) >= _layer(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _imports(name, path, top_level_only=True):
            target = _resolve(target, modules)  # a package import resolves to its __init__
            targets.add(target if target in modules else f"{target}.__init__")
        graph[name] = {t for t in targets if t in modules and t != name}
    graph = {
        n.removesuffix(".__init__"): {t.removesuffix(".__init__") for t in ts} for n, ts in graph.items()
    }

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen and nxt.split(".")[0] == start.split(".")[0]:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [" -> ".join(c) for name in graph if (c := cycle_from(name))]
    # a package's __init__ importing its own submodules is how packages expose them, not a cycle
    cycles = [c for c in cycles if not re.fullmatch(r"(\w+)( -> \1\.\w+)* -> \1", c)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("pattern", [r"task ?== ?", r"task in \(", r"task ?!= ?", r"\.task\.name ?[!=]="])
def test_no_task_name_branch_outside_the_task_modules(pattern):
    offenders = [
        f"{name}: {line.strip()}"
        for name, path in _modules().items()
        if not name.startswith("tasks.")
        for line in path.read_text().splitlines()
        if re.search(pattern, line)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checks_see_a_wrong_import(tmp_path, monkeypatch):
    """Positive control: a data module importing the task layer is reported."""
    fake = tmp_path / "data" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("from ..tasks import Task\n")
    assert _imports("data.bad", fake, top_level_only=False) == {"tasks"}
    assert _layer("tasks") > _layer("data.bad")
