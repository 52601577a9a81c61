"""The package's import graph: no circles, no upward imports.

Every ``import`` / ``from ... import`` of a ``mixkd`` module is an edge, at module level AND inside
functions (an import inside a function is still a dependency: hiding one there to dodge a circle
does not remove the circle). Each module belongs to a layer of the data flow; a module may import
its own layer and the layers below, never a layer above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mixkd"

# The data flow, bottom to top. A module's layer is that of the longest prefix listed.
LAYERS = [
    ("config", ["mixkd", "mixkd.errors", "mixkd.config", "mixkd.files", "mixkd.header", "mixkd.checkpoint", "mixkd.control", "mixkd.distributed",
                "mixkd.metrics", "mixkd.registry"]),
    ("data", ["mixkd.data"]),
    ("mix", ["mixkd.mix", "mixkd.augment"]),
    ("models", ["mixkd.models"]),
    ("distiller/losses", ["mixkd.losses", "mixkd.feature_losses", "mixkd.distiller", "mixkd.distillers", "mixkd.methods",
                          "mixkd.mlkd_loss"]),
    ("step", ["mixkd.step"]),
    ("run", ["mixkd.run_folder", "mixkd.validate", "mixkd.engine", "mixkd.pack", "mixkd.run", "mixkd.learner",
             "mixkd.budget", "mixkd.output", "mixkd.loading", "mixkd.device", "mixkd.teacher", "mixkd.evaluation",
             "mixkd.tracking"]),
    ("analysis", ["mixkd.analysis"]),  # mixkd analyze: reads a finished run
    ("study", ["mixkd.study"]),
    ("results/claims", ["mixkd.results", "mixkd.claims", "mixkd.study.results", "mixkd.study.claims",
                        "mixkd.study.rows"]),
    ("report", ["mixkd.study.report", "mixkd.study.tables", "mixkd.study.figures"]),
    ("cli", ["mixkd.cli", "mixkd.__main__", "mixkd.demo", "mixkd.study.cli"]),
]
# Modules whose layer is not their prefix's: the study package's ``__init__`` gathers the public names
# of every study layer (report included) for users; no study module imports it.
EXACT = {"mixkd.study": "report"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    if name in EXACT:
        return [n for n, _ in LAYERS].index(EXACT[name])
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"module {name} has no layer: add it to LAYERS in {__file__}"
    return index


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported mixkd module, line) for every import in ``path``, wherever it stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from mixkd.study import runner`` names a submodule; ``from mixkd.study import x`` the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c of a module a.b: a.b
                target = target.rpartition(".")[0]
            if target.startswith("mixkd") and target != name:
                found.append((target, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target, _ in edges.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def upward(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [f"{name} (layer {LAYERS[layer(name)][0]}) imports {target} (layer {LAYERS[layer(target)][0]}) "
            f"at line {line}" for name, targets in edges.items() for target, line in targets
            if layer(target) > layer(name)]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_layer_above_its_own():
    problems = upward(graph())
    assert problems == [], "upward imports:\n" + "\n".join(problems)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The graph as built, plus one edge that closes a circle (the study's runner importing back from its
    planner, which reads the runner's folder state) and one edge up (the mixing importing the study)."""
    edges = graph()
    assert any(t == "mixkd.study.spec" for t, _ in edges["mixkd.study.plan"]), "plan should import spec"
    edges["mixkd.study.spec"] = [*edges["mixkd.study.spec"], ("mixkd.study.plan", 1)]
    assert find_cycle(edges) is not None
    assert find_cycle({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [("b", 1)], "b": [("c", 1)], "c": []}) is None
    edges = graph()
    edges["mixkd.mix"] = [("mixkd.study.spec", 7)]
    assert upward(edges) == ["mixkd.mix (layer mix) imports mixkd.study.spec (layer study) at line 7"]


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    from mixkd.study import runner\n", ["mixkd.study.runner"]),
    ("from mixkd.study.spec import PlannedRun\n", ["mixkd.study.spec"]),
    ("from . import spec\n", ["mixkd.study.spec"]),
    ("import mixkd.engine as e\n", ["mixkd.engine"]),
])
def test_imports_inside_functions_and_relative_ones_are_edges(tmp_path, source, expected):
    probe = tmp_path / "_probe.py"  # read as a module of the study package
    probe.write_text(source)
    known = {**modules(), "mixkd.study._probe": probe}
    assert [t for t, _ in imports("mixkd.study._probe", probe, known)] == expected
