"""The folder tree is the architecture: read every import with `ast` and check the layers hold.

    __main__ cli        the command line, `python -m sceneml` (torch-free)
    tasks/              one module per MLflow entry point
    tracking/           the MLflow I/O layer
    engine/             torch only: the epoch loop, inference, checkpoints, feature cache, DDP
    models              torchvision networks and their weights
    data/ metrics comparison scores plots analysis/ report space    pure
    config mlproject params errors    torch-free: the declarations of every parameter
A module may import its own layer and the layers below, never one above; there is no import cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "sceneml"
RANK = {"sceneml": 0, "errors": 0, "params": 0, "config": 0, "architectures": 0, "mlproject": 0, "class_keys": 0,
        "data": 1, "metrics": 1, "comparison": 1, "scores": 1, "plots": 1, "analysis": 1, "report": 1, "space": 1,
        "models": 2, "engine": 3, "tracking": 4, "tasks": 5, "cli": 6, "__main__": 7}
TORCH_FREE = {"sceneml", "errors", "params", "config", "architectures", "mlproject", "class_keys", "cli", "__main__",
              "metrics",
              "comparison",
              "scores", "data", "report", "space"}
MLFLOW_ALLOWED = {"tracking", "tasks"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every imported module name, lazy imports inside functions included."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            # `from sceneml.tracking import pyfunc` imports the submodule sceneml.tracking.pyfunc
            names += [f"{node.module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()]
    return names


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sceneml"


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(RANK), {_layer(m) for m in MODULES} - set(RANK)


def test_no_module_imports_a_higher_layer():
    upward = [(m, i) for m, imports in MODULES.items() for i in imports
              if i.startswith("sceneml") and RANK[_layer(i)] > RANK[_layer(m)]]
    assert upward == []


def test_torch_and_mlflow_stay_in_their_layers():
    torch_in = [(m, i) for m, imports in MODULES.items() for i in imports
                if _layer(m) in TORCH_FREE and i.split(".")[0] in ("torch", "torchvision")]
    assert torch_in == []
    mlflow_in = [(m, i) for m, imports in MODULES.items() for i in imports
                 if i.split(".")[0] == "mlflow" and _layer(m) not in MLFLOW_ALLOWED]
    assert mlflow_in == []


def test_no_import_cycle():
    graph = {m: {i for i in imports if i in MODULES and i != m} for m, imports in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages re-export, not a cycle
    graph = {m: {i for i in deps if not (i.startswith(m + ".") or m.startswith(i + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, m, dep])}"
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_entry_point_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "entrypoints" / "train.py"), "--help"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and "--optimizer" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "sceneml.config" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "mlflow")}


MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_CLASS_LINES = 60, 8, 150


def test_every_function_and_class_fits_a_screen():
    """No function over 60 lines or with more than 8 parameters (self and cls aside), no class over 150
    lines: what a reader takes in at once."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                count = len(names) + bool(args.vararg) + bool(args.kwarg)
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES or count > MAX_PARAMETERS:
                    too_big.append(f"{where} {node.name}: {lines} lines, {count} parameters")
            elif isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"{where} class {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []
