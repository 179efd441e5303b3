"""Each top-level folder has one role, and nothing imports "upwards": the engine knows
no Flower, the shared task code knows neither app, the client knows no server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zoo", "fusion", "strategies", "task", "server", "client", "tools", "deploy")
FORBIDDEN = {
    "zoo": {"flwr", "otfusion.fusion", "otfusion.strategies", "otfusion.task",
            "otfusion.server", "otfusion.client", "otfusion.tools", "otfusion.deploy"},
    "fusion": {"flwr", "otfusion.strategies", "otfusion.task", "otfusion.server",
               "otfusion.client", "otfusion.tools", "otfusion.deploy"},
    "task": {"otfusion.strategies", "otfusion.server", "otfusion.client", "otfusion.tools",
             "otfusion.deploy"},
    "strategies": {"otfusion.task", "otfusion.server", "otfusion.client", "otfusion.tools",
                   "otfusion.deploy"},
    "client": {"otfusion.server", "otfusion.tools"},
    "deploy": {"otfusion.server", "otfusion.client", "otfusion.tools"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_upward_imports(folder):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    # the one deliberate exception: the deprecated alias of the engine's old place
    found = [f for f in found if not f.startswith("strategies/fusion.py")]
    assert not found, found


def test_every_package_is_built_and_copied_into_the_app_image():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {path.split("/")[0] for path in config["package-dir"].values()}
    assert folders == set(PACKAGES)
    dockerfile = (ROOT / "docker" / "app.Dockerfile").read_text()
    for folder in PACKAGES:
        assert f"COPY --chown=app:app {folder} " in dockerfile, folder
