"""The architecture, checked from the source: no file-level import cycles, no private names across front ends.

The layer rules themselves are import-linter contracts in pyproject.toml (`lint-imports`, run by
./test.sh); this file checks what import-linter does not: cycles between single files (imports
inside functions included) and front ends reaching into other modules' private names.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = ("modules/server", "modules/ui", "modules/cli.py", "modules/cli_img2img.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "modules").rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of `known` that the file imports, anywhere in it (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, name, path.name == "__init__.py")
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one file."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_file_level_import_cycles_under_modules():
    cycles = strongly_connected(import_graph())
    assert cycles == [], "import cycles between files: " + "; ".join(" <-> ".join(c) for c in cycles)


def _private_uses(path: Path, known: set[str], source: str | None = None) -> list[str]:
    name = module_name(path)
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    module_aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            target = _absolute(node, name, path.name == "__init__.py")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {target}.{alias.name}")
                if f"{target}.{alias.name}" in known:
                    module_aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {module_aliases[node.value.id]}.{node.attr}")
    return found


def test_the_private_name_finder_finds_them():
    probe = ("from modules.server import convert\nfrom modules.jobs.submit import _validate\n"
             "import modules.jobs.payload as payload\nx = convert._location, payload._coerce, convert.submit\n")
    uses = _private_uses(ROOT / "modules" / "ui" / "probe.py", set(source_files()), probe)
    assert len(uses) == 3, uses


def test_front_ends_use_no_private_names_of_other_modules():
    known = set(source_files())
    paths = [p for front in FRONT_ENDS for p in ([ROOT / front] if front.endswith(".py")
                                                 else sorted((ROOT / front).rglob("*.py")))]
    uses = [use for path in paths for use in _private_uses(path, known)]
    assert uses == []


def test_import_linter_contracts_hold():
    """The same check ./test.sh runs first, so a violation also shows up in a plain pytest run."""
    run = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
