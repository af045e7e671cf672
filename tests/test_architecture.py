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


def test_the_client_knows_nothing_of_the_simulations_start_up_speed_ups():
    from simulations.shared_pool import SHARED_POOL_ENV
    from simulations.startup import RUN_CONFIG_ENV

    names = (SHARED_POOL_ENV, RUN_CONFIG_ENV, "shared_pool", "load_slot")
    found = {str(path.relative_to(REPO)): name for path in sorted((REPO / "client").rglob("*.py"))
             for name in names if name in path.read_text()}
    assert found == {}
