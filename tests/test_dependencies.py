"""Every third-party module the code imports is declared in pyproject.toml (issue 10, point 15).

An undeclared import works in the venv that happens to have it (joserfc came with authlib) and
breaks the day that transitive dependency goes. The imports are read with `ast`, so an import
inside a function (the heavy backends import lazily) counts too; import names are mapped to
distributions with importlib.metadata.packages_distributions().
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("serve_app", "deployments", "tools", "tests", "bench")
CLIENT = ROOT / "client"  # a distribution of its own, with its own pyproject.toml (make installs it)
LOCAL = set(SCANNED) | {"aligner_client"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def _third_party_imports(root: Path, folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for everything neither stdlib nor ours."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (root / folder).rglob("*.py"):
            for module in _imported_top_level_modules(path) - LOCAL - set(sys.stdlib_module_names):
                found.setdefault(module, set()).add(str(path.relative_to(root)))
    return found


def _declared_distributions(root: Path) -> set[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in requirements}


def _undeclared(root: Path, folders: tuple[str, ...]) -> dict:
    distributions = importlib.metadata.packages_distributions()
    declared = _declared_distributions(root)
    undeclared = {}
    for module, files in sorted(_third_party_imports(root, folders).items()):
        providers = {_normalise(name) for name in distributions.get(module, [])}
        if not providers & declared:
            undeclared[module] = (sorted(providers) or ["<not installed>"], sorted(files)[:3])
    return undeclared


def test_every_third_party_import_is_a_declared_distribution():
    undeclared = _undeclared(ROOT, SCANNED)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_clients_imports_are_declared_in_its_own_pyproject():
    undeclared = _undeclared(CLIENT, ("aligner_client",))
    assert not undeclared, f"imported but not declared in client/pyproject.toml: {undeclared}"


def test_the_scan_sees_imports_inside_functions_too():
    # The heavy backends import lazily; a scan of module-level imports only would miss them.
    modules = _imported_top_level_modules(ROOT / "deployments" / "backends" / "qwen3.py")
    assert {"torch", "qwen_asr", "huggingface_hub"} <= modules

