"""The documentation's examples run, so they cannot drift from the code (FastStream's docs_src pattern).

Every file under docs_src/ is run here: each module is imported, and the tests and fixtures it
defines become tests and fixtures of this module (the fixtures shadow tests/conftest.py's for them);
each shell session's `pipeline` lines parse against the real CLI and its `make` lines name real
targets. Every example is shown on a page, and a page shows Python only by including docs_src/.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import typer
from typer.core import TyperGroup

from streams import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DOCS_SRC = ROOT / "docs_src"

# `--8<-- "path"` or `--8<-- "path:section"` / `"path:3:9"` (pymdownx.snippets, one file a line).
SNIPPET = re.compile(r'^\s*-+8<-+\s+"(?P<path>[^":]+)(?::[^"]*)?"\s*$')
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*\{?\s*\.?(?P<lang>[\w+-]*)")
PYTHON = {"python", "py", "python3", "py3", "pycon"}
MAKE_TARGET = re.compile(r"^(?P<targets>[\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)", re.MULTILINE)


def example_files() -> list[Path]:
    """Every file under docs_src/, bytecode caches aside."""
    return sorted(p for p in DOCS_SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_examples() -> list[Path]:
    return [p for p in example_files() if p.suffix == ".py"]


def defined_tests_and_fixtures(path: Path) -> tuple[list[str], list[str]]:
    """Names of the module-level test functions and pytest fixtures a file defines (read from its source)."""
    tests: list[str] = []
    fixtures: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if any("fixture" in ast.unparse(d) for d in node.decorator_list):
            fixtures.append(node.name)
        elif node.name.startswith("test_"):
            tests.append(node.name)
    return tests, fixtures


def _adopt_examples() -> dict[str, object]:
    """The examples' tests (renamed after their file) and fixtures (under their own names)."""
    adopted: dict[str, object] = {}
    for path in python_examples():
        tests, fixtures = defined_tests_and_fixtures(path)
        if not tests and not fixtures:
            continue
        module = importlib.import_module(module_name(path))
        prefix = "_".join(path.relative_to(DOCS_SRC).with_suffix("").parts)
        names = [(f"test_{prefix}__{t.removeprefix('test_')}", t) for t in tests] + [(f, f) for f in fixtures]
        for key, name in names:
            assert key not in adopted, f"{path}: `{name}` is defined by another example too"
            adopted[key] = getattr(module, name)
    return adopted


ADOPTED = _adopt_examples()
_clashes = set(ADOPTED) & set(globals())
assert not _clashes, f"docs_src defines names this module uses: {_clashes}"
globals().update(ADOPTED)


def test_every_example_runs_somewhere() -> None:
    """Each docs_src/ module defines tests or fixtures, or is imported by one that does."""
    modules = {module_name(p): p for p in python_examples() if p.name != "__init__.py"}
    imports: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        imports[name] = targets & set(modules)
    run = {name for name, path in modules.items() if any(defined_tests_and_fixtures(path))}
    frontier = list(run)
    while frontier:
        for imported in imports[frontier.pop()] - run:
            run.add(imported)
            frontier.append(imported)
    assert set(modules) - run == set(), "examples nothing runs: give them a test or import them from one"
    assert any(key.startswith("test_") for key in ADOPTED), "no example test was found"


@pytest.mark.parametrize("path", python_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_module_imports(path: Path) -> None:
    """Every Python example imports cleanly."""
    module = importlib.import_module(module_name(path))
    assert isinstance(module, ModuleType)


def parse_cli(args: list[str]) -> str:
    """Parse `pipeline ARGS` as the CLI would (types, choices, required options) without running it;
    the command's path."""
    command = typer.main.get_command(cli.app)
    ctx = typer.Context(command, info_name="pipeline")
    while isinstance(command, TyperGroup):
        assert args, f"`{ctx.command_path}` needs a subcommand"
        name, *args = args
        sub = command.get_command(ctx, name)
        assert sub is not None, f"`{ctx.command_path}` has no command `{name}`"
        command, ctx = sub, typer.Context(sub, info_name=name, parent=ctx)
    command.make_context(ctx.info_name, args, parent=ctx.parent)  # raises UsageError on a bad line
    return ctx.command_path


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for m in MAKE_TARGET.finditer(text) for t in m.group("targets").split()}


def shell_commands(path: Path) -> list[list[str]]:
    lines = (shlex.split(line, comments=True) for line in path.read_text().splitlines())
    return [argv for argv in lines if argv]


@pytest.mark.parametrize(
    "path", [p for p in example_files() if p.suffix == ".sh"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_shell_example_names_real_commands_and_options(path: Path) -> None:
    """`pipeline ...` lines parse against the CLI (commands, options, values); `make` lines name real targets."""
    commands = shell_commands(path)
    assert commands, f"{path} holds no command"
    for argv in commands:
        program, *args = argv
        if Path(program).name == "pipeline":
            assert parse_cli(args).startswith("pipeline "), argv
        elif program == "make":
            assert set(args) <= make_targets(), f"{argv}: no such make target"


def test_every_example_file_has_a_runner() -> None:
    """A new kind of example file gets a runner here before it can be shown."""
    assert {p.suffix for p in example_files()} <= {".py", ".sh"}


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, body lines) of every fenced code block, indented ones (admonitions, tabs) included."""
    blocks: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        fence = opening.group("fence")
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        blocks.append((opening.group("lang").lower(), body))
    return blocks


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_pages_show_python_only_from_docs_src() -> None:
    """A ```python block on a page is nothing but snippet includes of files under docs_src/."""
    inline: list[str] = []
    for page in pages():
        for lang, body in fenced_blocks(page.read_text()):
            if lang not in PYTHON:
                continue
            for line in filter(str.strip, body):
                include = SNIPPET.match(line)
                if include is None or not include.group("path").startswith("docs_src/"):
                    inline.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert not inline, "put the code in a file under docs_src/ and include it with --8<--:\n" + "\n".join(inline)


def test_every_example_is_shown_on_a_page() -> None:
    """Each example under docs_src/ (package markers aside) is included by some page."""
    included = {
        m.group("path") for page in pages() for line in page.read_text().splitlines() if (m := SNIPPET.match(line))
    }
    examples = {str(p.relative_to(ROOT)) for p in example_files() if p.name != "__init__.py"}
    assert examples - included == set(), "examples no page shows"


def test_the_inline_python_check_can_fail() -> None:
    """The block scanner sees an inline python block, indented ones too, and accepts an include."""
    page = '```python\nprint("hi")\n```\n\n!!! note\n    ```py\n    --8<-- "docs_src/x.py"\n    ```\n'
    assert fenced_blocks(page) == [("python", ['print("hi")']), ("py", ['    --8<-- "docs_src/x.py"'])]
    assert SNIPPET.match('    --8<-- "docs_src/x.py:section"') is not None
    assert SNIPPET.match('print("hi")') is None
