"""Import boundaries: db/ stands alone; receiver/ and forwarder/ use db/; stowaway/ composes.

dicomweb/ (the DICOMweb read client) stands alone too: receiver/ uses it for query/retrieve,
and it is handed its authentication by the composing layer.

Every folder installs under the one name ``stowaway`` (``stowaway.db``, ``stowaway.receiver``,
...); the top-level command-line modules in ``stowaway/`` are the composing layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("db", "receiver", "forwarder", "dicomweb", "migrations")
FORBIDDEN = {
    "db": {"receiver", "forwarder", "stowaway"},
    "receiver": {"forwarder", "stowaway"},
    "forwarder": {"receiver", "stowaway"},
    "dicomweb": {"receiver", "forwarder", "db", "stowaway"},
}
# The folders' old top-level names: importing one would work only from a source checkout.
BARE_NAMES = set(LAYERS)
# Leaf modules: any layer may import them, and they import nothing from the project.
LEAVES = {"stowaway.text", "stowaway.lenient_json", "stowaway.backoff", "stowaway.batch_limits"}


def layer_of(module: str) -> str | None:
    """``stowaway.db.queue`` -> ``db``; ``stowaway.cli`` -> ``stowaway``; a leaf module or
    anything outside the project -> None."""
    parts = module.split(".")
    if parts[0] != "stowaway" or any(
        module == leaf or module.startswith(leaf + ".") for leaf in LEAVES
    ):
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "stowaway"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imported_layers(path: Path) -> set[str]:
    # `from stowaway import migrations` records both `stowaway` and `stowaway.migrations`;
    # the bare package name is only the way to the layer, not a use of the composing layer.
    return {
        layer
        for m in imported_modules(path)
        if m != "stowaway" and (layer := layer_of(m)) is not None
    }


def python_files(folder: str) -> list[Path]:
    """The folder's own files, not those reached through the layer links in stowaway/."""
    return sorted(
        path
        for path in (ROOT / folder).rglob("*.py")
        if not any((ROOT / parent).is_symlink() for parent in path.relative_to(ROOT).parents)
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_its_boundary(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_layers(path) & FORBIDDEN[package])
        for path in python_files(package)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    "folder",
    ["db", "receiver", "forwarder", "dicomweb", "migrations", "stowaway", "bench", "tests"],
)
def test_no_module_imports_a_folder_by_its_bare_name(folder: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] in BARE_NAMES
        )
        for path in python_files(folder)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_layer_links_point_at_the_top_level_folders() -> None:
    """``stowaway/db`` etc. are links, so tools that do not know setuptools' package-dir
    mapping (mypy, editors) see the installed names; they must not drift into copies."""
    for layer in LAYERS:
        link = ROOT / "stowaway" / layer
        assert link.is_symlink(), f"stowaway/{layer} must be a link to ../{layer}"
        assert link.resolve() == (ROOT / layer).resolve()


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_a_leaf_module_imports_nothing_from_the_project(leaf: str) -> None:
    path = ROOT / (leaf.replace(".", "/") + ".py")
    assert {m for m in imported_modules(path) if m.split(".")[0] == "stowaway"} == set()
