"""Meta-tests, as Datasette has: every hook is documented, has a docstring and has a test;
extensions use only the public API."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import pytest

from modules.plugins import api, hookspecs, specs
from modules.settings import REPO_ROOT

HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec"))
DOCS = (REPO_ROOT / "docs" / "extensions.md").read_text(encoding="utf-8")
TEST_SOURCES = "\n".join(p.read_text(encoding="utf-8") for p in (REPO_ROOT / "tests").glob("test_*.py"))


def test_the_hook_list_is_what_we_expect():
    assert len(HOOKS) >= 12 and {"register_samplers", "prepare_params", "cfg_denoiser", "register_api_routes"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_one_line_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and "\n" not in doc.strip(), hook


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_an_example(hook):
    match = re.search(rf"^### `{hook}`\n(.*?)(?=^### |^## |\Z)", DOCS, re.S | re.M)
    assert match, f"docs/extensions.md has no '### `{hook}`' section"
    assert "```python" in match.group(1) and "@api.hookimpl" in match.group(1), f"{hook} has no example"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert re.search(rf"^def test_hook_{hook}\b", TEST_SOURCES, re.M), f"no test_hook_{hook} in tests/"


def test_every_spec_class_has_a_docstring_and_is_public():
    classes = [c for c in vars(specs).values() if inspect.isclass(c) and dataclasses.is_dataclass(c)
               and c.__module__ == specs.__name__]
    for cls in classes:
        assert cls.__doc__ and cls.__doc__.strip(), cls.__name__
        assert getattr(api, cls.__name__) is cls, f"{cls.__name__} is not re-exported by api.py"


def test_api_exports_exist():
    for name in api.__all__:
        assert hasattr(api, name), name
    assert re.fullmatch(r"\d+\.\d+", api.API_VERSION)


def _module_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module + "".join(f".{a.name}" for a in node.names if node.module == "modules.plugins")


@pytest.mark.parametrize("folder", ["extensions", "tests/extension_fixtures"])
def test_extensions_import_only_the_public_api(folder):
    files = list((REPO_ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        for module in _module_imports(path):
            if module.startswith("modules"):
                assert module == "modules.plugins.api", f"{path} imports {module}"
