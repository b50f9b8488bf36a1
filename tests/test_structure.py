"""The house rules a reviewer would otherwise check by hand.

- no import cycle among the project's modules (lazy imports inside functions count: a cycle broken
  only by importing late is still a cycle a newcomer trips over);
- SQLAlchemy is spoken only inside `knowledge/`: the store owns every query, so nothing else imports
  it or opens a store session;
- no module outside the tests is over 600 lines.

Each check is a function over a folder, tried here on a small planted tree first, so a check that
stopped finding anything would fail too.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "knowledge", "learning", "bench")
MAX_LINES = 600
DATABASE_LIBRARIES = {"sqlalchemy", "alembic"}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        _module_name(root, p): p
        for pkg in packages
        if (root / pkg).is_dir()
        for p in sorted((root / pkg).rglob("*.py"))
    }


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`: they never run, so they make no cycle."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        lines.add(sub.lineno)
    return lines


def _imported(name: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The project modules one import statement loads (a `from pkg import mod` names the module)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".")
            if not str(modules[name]).endswith("__init__.py"):
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside functions."""
    modules = _sources(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
                edges |= _imported(name, node, modules)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return []


def database_leaks(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Modules outside `knowledge/` that import a database library or open a store session."""
    bad = []
    for name, path in _sources(root, packages).items():
        if name.split(".")[0] == "knowledge":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                libs = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                libs = {node.module.split(".")[0]}
            else:
                libs = set()
            for lib in libs & DATABASE_LIBRARIES:
                bad.append(f"{name}:{node.lineno} imports {lib}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "session"
            ):
                bad.append(f"{name}:{node.lineno} opens a store session")
    return bad


def long_modules(root: Path, packages: tuple[str, ...], limit: int = MAX_LINES) -> list[str]:
    return [
        f"{path.relative_to(root)}: {n} lines"
        for path in _sources(root, packages).values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > limit
    ]


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small tree with one of each fault: a cycle made by a late import, a query outside knowledge."""
    files = {
        "bot/__init__.py": "",
        "bot/a.py": "from bot import b\n",
        "bot/b.py": "def late():\n    from bot.c import x\n",
        "bot/c.py": (
            "from typing import TYPE_CHECKING\nimport bot.a\n"
            "if TYPE_CHECKING:\n    from bot import b\nx = 1\n"
        ),
        "bot/d.py": "from bot.a import *\n",
        "learning/__init__.py": "",
        "learning/q.py": (
            "from sqlalchemy import select\n\ndef f(store):\n    with store.session() as s:\n        pass\n"
        ),
        "knowledge/__init__.py": "",
        "knowledge/store.py": "from sqlalchemy import select\n" + "x = 1\n" * (MAX_LINES + 1),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_checks_find_each_planted_fault(planted: Path) -> None:
    packages = ("bot", "learning", "knowledge")
    cycle = find_cycle(import_graph(planted, packages))
    assert set(cycle) == {"bot.a", "bot.b", "bot.c"}
    assert database_leaks(planted, packages) == [
        "learning.q:1 imports sqlalchemy",
        "learning.q:4 opens a store session",
    ]
    assert long_modules(planted, packages) == [f"knowledge/store.py: {MAX_LINES + 2} lines"]


def test_an_import_under_type_checking_makes_no_cycle(planted: Path) -> None:
    (planted / "bot/b.py").write_text("x = 2\n")  # c -> a -> b, and c's import of b never runs
    assert find_cycle(import_graph(planted, ("bot",))) == []


def test_no_import_cycle_among_the_project_modules() -> None:
    cycle = find_cycle(import_graph(ROOT, PACKAGES))
    assert not cycle, " -> ".join(cycle)


def test_only_knowledge_speaks_to_the_database() -> None:
    leaks = database_leaks(ROOT, PACKAGES)
    assert not leaks, leaks


def test_no_module_is_over_600_lines() -> None:
    too_long = long_modules(ROOT, PACKAGES)
    assert not too_long, too_long
