"""The import rules of docs/architecture.md: a dependency never runs upward (the deployable
client and the shared code import no simulation code; the server no client code)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

ALLOWED = {"common": {"common"}, "client": {"common", "client"},
           "server": {"common", "server"}}
PACKAGES = {"common", "client", "server", "simulations"}


def _imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):  # inside functions too: a lazy import is still a dependency
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PACKAGES


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_it_may(package):
    wrong = {str(path.relative_to(REPO)): sorted(_imported_packages(path) - ALLOWED[package])
             for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: names for path, names in wrong.items() if names} == {}
