"""Guards for an application that ships generic top-level package names (STYLE.md section 3)."""

from __future__ import annotations

import ast
import importlib
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.conftest import REPO

OURS = ("crmhub", "connectors", "sync", "dedupe")


@pytest.mark.parametrize("name", OURS)
def test_our_packages_are_the_ones_imported(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO)
    assert packages_distributions().get(name) in (None, ["crmhub"])


def test_no_dependency_shadows_our_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        deps.extend(extra)
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in deps}
    assert names.isdisjoint({"dedupe", "sync", "connectors", "mappings"})


# Imports point one way: kernel <- connectors, dedupe <- sync <- cli/web.
ALLOWED = {
    "crmhub": {"crmhub"},
    "connectors": {"crmhub", "connectors"},
    "dedupe": {"crmhub", "dedupe"},
    "sync": {"crmhub", "connectors", "dedupe", "sync"},
}
TOP = {"crmhub.cli", "crmhub.web"}  # may import everything


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    ours = {"crmhub", "connectors", "dedupe", "sync"}
    bad = []
    for path in (REPO / package).rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if any(module == t or module.startswith(t + ".") for t in TOP) or "migrations" in module:
            continue
        for name in _imports(path):
            root = name.split(".")[0]
            if root in ours and root not in ALLOWED[package]:
                bad.append(f"{module} imports {name}")
    assert bad == []
