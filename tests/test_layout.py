"""The shape of the code, held by tests: short modules, imports at the top and downwards only,
private names kept in their module, each heavy dependency imported in one place. (The layers
themselves are import-linter contracts in pyproject.toml, run by CI.)"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bnfold", "cli")
MAX_LINES = 400
#: The only modules that may import these packages.
HEAVY_IMPORTS = {"torch.onnx": "bnfold/export", "onnxruntime": "bnfold/runtime.py"}


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str, list[str]]]:
    """(node, module, imported names) for every import statement."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node, alias.name, []) for alias in node.names)
    return found


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_module_is_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines; split it by responsibility"


@pytest.mark.parametrize(
    "path", [p for p in _modules() if _name(p).startswith("bnfold")], ids=_name
)
def test_bnfold_imports_are_at_module_level(path: Path) -> None:
    """An import of bnfold inside a function hides a circle or a wrong layer. (The CLI imports
    the library when a command runs, so that `bnfold --help` does not load torch.)"""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    inner = [
        f"line {node.lineno}: {module}"
        for node, module, _ in _imports(tree)
        if module.split(".")[0] in PACKAGES and id(node) not in top
    ]
    assert not inner, f"{_name(path)} imports bnfold inside a block: {inner}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_private_names_stay_in_their_module(path: Path) -> None:
    tree = ast.parse(path.read_text())
    crossing = [
        f"{module}.{name}"
        for _, module, names in _imports(tree)
        if module.split(".")[0] in PACKAGES
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not crossing, f"{_name(path)} imports private names: {crossing}"


def _uses(tree: ast.AST, package: str) -> bool:
    """Whether ``tree`` imports ``package`` (or a submodule) or reads it as ``torch.onnx``."""
    parent, _, leaf = package.rpartition(".")
    for _, module, names in _imports(tree):
        if module == package or module.startswith(package + "."):
            return True
        if parent and module == parent and leaf in names:
            return True
    return any(
        isinstance(node, ast.Attribute) and ast.unparse(node) == package for node in ast.walk(tree)
    )


@pytest.mark.parametrize("package", sorted(HEAVY_IMPORTS))
def test_heavy_dependencies_are_imported_in_one_place(package: str) -> None:
    owner = HEAVY_IMPORTS[package]
    users = [
        _name(path)
        for path in _modules()
        if not _name(path).startswith(owner) and _uses(ast.parse(path.read_text()), package)
    ]
    assert users == [], f"only {owner} may use {package}; also used by {users}"


def test_no_import_cycles() -> None:
    """Module by module, not only between the layers that import-linter checks: no circle."""
    graph = grimp.build_graph("bnfold", "bnfold_cli")  # cli/ is installed as bnfold_cli
    edges = {m: graph.find_modules_directly_imported_by(m) & graph.modules for m in graph.modules}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
