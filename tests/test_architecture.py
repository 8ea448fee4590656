"""The package's layout as tests: module-level imports form no cycle and run one way, through the layers.

Read from the source with ``ast`` (nothing is imported): for every module of ``supsup_fast`` (and
``kernels/``, installed as ``supsup_fast.kernels``), the modules of the package it imports at module
level. Imports inside functions are deliberate late bindings and are not edges.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "supsup_fast"

# Imports run one way: a module may import modules of its own layer or lower ones, never higher.
LAYERS = [
    ("supsup_fast.errors", "supsup_fast.format", "supsup_fast.config", "supsup_fast.objectives",
     "supsup_fast.seed_format"),
    ("supsup_fast.ops._registry",),
    ("supsup_fast.ops", "supsup_fast.kernels"),
    ("supsup_fast.base_weights",),
    ("supsup_fast.backends", "supsup_fast.reference", "supsup_fast._native", "supsup_fast._gpu_backends"),
    ("supsup_fast.binarise", "supsup_fast.binarize", "supsup_fast.nn", "supsup_fast.ternary"),
    ("supsup_fast.model_tasks",),
    ("supsup_fast.convert",),
    ("supsup_fast.training", "supsup_fast.inference", "supsup_fast.nns", "supsup_fast.hopfield",
     "supsup_fast.modern_hopfield"),
    ("supsup_fast.checkpoint._files",),
    ("supsup_fast.checkpoint._manifest",),
    ("supsup_fast.checkpoint._shards",),
    ("supsup_fast.checkpoint._generations",),
    ("supsup_fast.checkpoint.model_state",),
    ("supsup_fast.checkpoint", "supsup_fast.distributed"),
    ("supsup_fast.info", "supsup_fast.models", "supsup_fast.data", "supsup_fast.experiment", "supsup_fast.cli",
     "supsup_fast.experiments", "supsup_fast.__main__", "supsup_fast.testing", "supsup_fast.integrations"),
]


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for root, name in ((PACKAGE, "supsup_fast"), (ROOT / "kernels", "supsup_fast.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules a module-level import statement of ``mod`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target not in MODULES:
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return subs or [target]


def _edges() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in _resolve(mod, node) if t != mod)
        graph[mod] = targets
    return graph


GRAPH = _edges()


def _layer(mod: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            # a package's private core sits below the package itself
            return i
    raise AssertionError(f"{mod} is in no layer of tests/test_architecture.py: add it where it belongs")


def test_every_module_has_a_layer():
    for mod in MODULES:
        if mod != "supsup_fast":
            _layer(mod)


def test_module_level_imports_have_no_cycle():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_imports_run_one_way():
    upward = []
    for mod, targets in GRAPH.items():
        if mod == "supsup_fast":
            continue
        for t in targets:
            if t != "supsup_fast" and _layer(t) > _layer(mod):
                upward.append(f"{mod} (layer {_layer(mod)}) imports {t} (layer {_layer(t)})")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_format_imports_nothing_of_the_package():
    assert GRAPH["supsup_fast.format"] == set()


def test_no_module_imports_after_its_code():
    """Imports come first: none after a def, class or statement (registration is an explicit call)."""
    late = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        seen_code = False
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if seen_code and any(t.startswith("supsup_fast") for t in _resolve(mod, node)):
                    late.append(f"{mod}:{node.lineno}")
            elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # docstrings
                if not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                    seen_code = True
    assert not late, f"package imports after module code: {late}"


def test_reference_is_imported_only_by_the_registry():
    """The reference path is the spec: production modules call ops, only the backends load it."""
    allowed = {"supsup_fast", "supsup_fast.backends", "supsup_fast.reference"}
    users = {m for m, t in GRAPH.items() if {"supsup_fast.backends.reference", "supsup_fast.reference"} & t}
    assert users <= allowed, sorted(users - allowed)


def test_import_loads_the_library_only():
    """`import supsup_fast` loads neither the application (experiments, data, CLI) nor the heavy
    optional modules; they load on first use, under their old names too."""
    code = (
        "import sys, supsup_fast as sf\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'safetensors') or m.startswith(("
        "'supsup_fast.experiments', 'supsup_fast.data', 'supsup_fast.cli', 'supsup_fast.experiment',"
        "'supsup_fast.checkpoint', 'supsup_fast.hopfield', 'supsup_fast.distributed', 'supsup_fast.integrations'))"
        " or m.split('.')[0] in ('avalanche', 'transformers', 'timm', 'torchvision', 'peft')]\n"
        "assert not bad, bad\n"
        "import supsup_fast.data, supsup_fast.experiments.data\n"
        "assert supsup_fast.data is supsup_fast.experiments.data\n"
        "assert sf.inference.infer_task and sf.checkpoint.save_bank\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
