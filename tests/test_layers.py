"""The package's layer picture holds: ``cli/`` -> ``judge``, ``serving/`` -> ``tasks/`` -> ``inference``,
``alignment/``, ``rewards``, ``evaluation``, ``streaming``, ``solving`` -> ``weights/``, ``data/``, ``checkpoint_io`` -> ``model/``,
``tokenizer``, ``callbacks``, ``optim``, ``checks``, ``errors``, ``lightning_internals``, ``config_tree``, ``results``.
No import runs upward, no modules import each other in a loop, ``model/`` and ``alignment/`` are pure torch (no
Lightning; ``alignment/`` takes nothing from ``tasks/``, ``data/`` or ``cli/``). An import inside a function (how the
command-line tools keep ``--help`` fast) counts exactly like one at the top of a module, so it can neither run upward
nor close a loop: it can only be there for start-up speed, never to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptlab"
LAYERS = {"model": 0, "tokenizer": 0, "tokenizer_training": 0, "callbacks": 0, "errors": 0, "checks": 0, "optim": 0, "lightning_internals": 0,
          "config_tree": 0, "results": 0, "run_lock": 0, "signals": 0, "loggers": 0,
          "weights": 1, "data": 1, "checkpoint_io": 1,
          "inference": 2, "alignment": 2, "rewards": 2, "evaluation": 2, "streaming": 2, "solving": 2,
          "tasks": 3, "judge": 4, "serving": 4, "cli": 5}
"""First name below ``gptlab.`` -> floor; a module imports only from its floor or below."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gptlab_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported gptlab module, whether the import sits inside a function) for every import."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inside) for a in child.names if a.name.split(".")[0] == "gptlab")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "gptlab":
                found.append((child.module, inside))
            visit(child, inside)

    visit(tree, False)
    return found


MODULES = {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_package_module_has_a_floor():
    assert [m for m in MODULES if m != "gptlab" and floor(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "gptlab"))
def test_no_import_runs_upward(module):
    for imported, in_function in gptlab_imports(MODULES[module]):
        where = " (inside a function)" if in_function else ""
        if imported == "gptlab":
            raise AssertionError(f"{module} imports the package root (the public API); import the module")
        assert floor(imported) <= floor(module), (
            f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)}){where}: upward")


def imported_names(tree: ast.AST) -> list[str]:
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return names + [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]


@pytest.mark.parametrize("package", ["gptlab.model", "gptlab.alignment"])
def test_model_and_alignment_are_pure_torch(package):
    for module, tree in MODULES.items():
        if module.startswith(package):
            bad = [n for n in imported_names(tree)
                   if n.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf")]
            assert bad == [], f"{module} imports {bad}"


def test_alignment_takes_nothing_from_tasks_data_or_cli():
    for module, tree in MODULES.items():
        if module.startswith("gptlab.alignment"):
            bad = [n for n in imported_names(tree) if n.startswith(("gptlab.tasks", "gptlab.data", "gptlab.cli"))]
            assert bad == [], f"{module} imports {bad}"


def test_alignment_and_inference_stand_below_tasks():
    assert floor("gptlab.alignment.losses") < floor("gptlab.tasks.dpo")
    assert floor("gptlab.inference") < floor("gptlab.tasks.dpo")


def test_no_modules_import_each_other_in_a_loop():
    graph = {m: {i for i, _ in gptlab_imports(t) if i in MODULES and i != m} for m, t in MODULES.items()}
    graph["gptlab"] = set()  # the root only re-exports the public API
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_tool_module_imports_another_tool():
    """A console tool's module (``pyproject.toml`` [project.scripts]) is an entry point, never a
    library: what two tools share lives in ``gptlab.cli`` (the entry factory) or below it."""
    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    tools = {target.partition(":")[0] for target in scripts.values()}
    for module in tools:
        shared = sorted({i for i, _ in gptlab_imports(MODULES[module]) if i in tools and i != module})
        assert shared == [], f"{module} imports the tool module(s) {shared}"
