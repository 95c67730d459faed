"""The layout is the architecture: every import goes down the layers, and nothing imports in a circle.

`streams/__init__.py` names the layers; each subpackage's docstring says what it may import.
`schemas` stands alone, `handlers` never touches a broker, a database or the worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first: a module may import its own layer and the ones before it.
LAYERS = (
    "schemas",
    "handlers",
    "streams.core",
    "streams.flows",
    "streams.policy",
    "streams.eventstore",
    "streams.transport",
    "streams.ops",
    "streams.consume",
    "streams.deadletters",
    "streams.app",
    "streams.cli",
)
# What handlers may not import: the domain code stays free of transport and storage.
HANDLERS_MAY_NOT = ("faststream", "aio_pika", "aiormq", "redis", "sqlalchemy", "asyncpg", "aiosqlite")
# `handlers.errors` is the exception vocabulary the failure policy reads; the foundation may use it.
SHARED_VOCABULARY = {"handlers.errors"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in ("schemas", "handlers", "streams"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = project_modules()


def resolve(name: str) -> str | None:
    """The project module an imported name lives in (`streams.core.names` for `streams.core.names.X`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every absolute import target a module names, as written (relative imports are not used here)."""
    tree = ast.parse(MODULES[module].read_text())
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import"
            base = node.module or ""
            targets.update(f"{base}.{alias.name}" for alias in node.names)
            targets.add(base)
    return targets


def project_imports(module: str) -> set[str]:
    return {target for name in imports_of(module) if (target := resolve(name)) and target != module}


def layer_of(module: str) -> int:
    matches = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    assert matches, f"{module} belongs to no layer: add it to a subpackage (or to LAYERS)"
    return max(matches)


def test_every_module_belongs_to_a_layer() -> None:
    loose = [m for m in MODULES if m.startswith("streams.") and m.count(".") == 1 and m != "streams.app"]
    loose = [m for m in loose if MODULES[m].name != "__init__.py"]
    assert loose == [], f"modules directly under streams/ besides app.py: {loose}"
    for module in MODULES:
        if module != "streams":
            layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "streams"))
def test_imports_go_down_the_layers(module: str) -> None:
    own = layer_of(module)
    upward = sorted(
        target
        for target in project_imports(module)
        if target != "streams" and target not in SHARED_VOCABULARY and layer_of(target) > own
    )
    assert upward == [], f"{module} ({LAYERS[own]}) imports from higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("handlers")))
def test_handlers_are_free_of_broker_and_storage_code(module: str) -> None:
    banned = sorted(name for name in imports_of(module) if name.split(".")[0] in HANDLERS_MAY_NOT)
    assert banned == [], f"{module} imports {banned}"
    assert not any(name.startswith("streams") for name in imports_of(module)), f"{module} imports streams"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("schemas")))
def test_schemas_import_nothing_else_of_the_project(module: str) -> None:
    others = sorted(t for t in project_imports(module) if not t.startswith("schemas"))
    assert others == [], f"{module} imports {others}"


def test_no_import_cycles() -> None:
    graph = {module: project_imports(module) - {"streams"} for module in MODULES}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], f"import cycles: {cycles}"


def test_the_check_sees_a_violation() -> None:
    """The checker itself: an upward import is found (a test of the test)."""
    assert layer_of("streams.core.names") < layer_of("streams.consume.pipeline")
    assert "streams.core.names" in project_imports("streams.consume.pipeline")
