"""The package's layer picture holds: ``cli/`` -> ``tasks/``, ``judge``, ``inference`` -> ``weights/``,
``data/`` -> ``model/``, ``tokenizer``, ``callbacks``. No import runs upward, no modules import each
other in a loop, ``model/`` is pure torch (no Lightning), and no gptlab import hides inside a
function (the usual way of dodging a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptlab"
LAYERS = {"model": 0, "tokenizer": 0, "callbacks": 0, "errors": 0, "checkpoint_io": 0, "run_lock": 0, "signals": 0, "loggers": 0, "weights": 1, "data": 1, "tasks": 2, "judge": 2,
          "inference": 2, "rewards": 2, "cli": 3}
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
def test_no_import_runs_upward_or_hides_in_a_function(module):
    for imported, in_function in gptlab_imports(MODULES[module]):
        assert not in_function, f"{module} imports {imported} inside a function"
        if imported == "gptlab":
            raise AssertionError(f"{module} imports the package root (the public API); import the module")
        assert floor(imported) <= floor(module), (
            f"{module} (floor {floor(module)}) imports {imported} (floor {floor(imported)}): upward")


def test_model_is_pure_torch():
    for module, tree in MODULES.items():
        if module.startswith("gptlab.model"):
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            bad = [n for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf")]
            assert bad == [], f"{module} imports {bad}"


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
