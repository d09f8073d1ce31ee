"""The built wheel installs one top-level name, ``stowaway``, and works from there alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path_factory.mktemp("source") / "stowaway"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            "tests",
            "bench",
            "build",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "stowaway-data",
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (found,) = out.glob("stowaway-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> tuple[Path, set[str]]:
    """A fresh venv that sees this interpreter's packages (the dependencies) and has the
    wheel installed; also returns what the install added to its site-packages."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(root)], check=True, timeout=120
    )
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    before = {p.name for p in site.iterdir()}
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    added = {p.name for p in site.iterdir()} - before
    return python, added


def test_the_wheel_holds_only_the_stowaway_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        top_level = zf.read(next(n for n in zf.namelist() if n.endswith("top_level.txt")))
    assert {t for t in tops if not t.endswith(".dist-info")} == {"stowaway"}
    assert top_level.decode().split() == ["stowaway"]


def test_installing_adds_no_top_level_name_but_stowaway(venv: tuple[Path, set[str]]) -> None:
    _, added = venv
    assert {name for name in added if not name.endswith(".dist-info")} == {"stowaway"}


def test_the_installed_package_runs_without_the_source_tree(
    venv: tuple[Path, set[str]], tmp_path: Path
) -> None:
    """Imported from the venv (not this checkout): every layer, the migrations with their
    alembic files, the console's static files, and the command line."""
    python, _ = venv
    probe = (
        "import pathlib, stowaway.db.queue, stowaway.receiver.scp, stowaway.forwarder.worker\n"
        "import stowaway.dicomweb.client, stowaway.receiver.query_retrieve\n"
        "from stowaway.db.migrate import SCRIPT_LOCATION\n"
        "assert (SCRIPT_LOCATION / 'env.py').is_file()\n"
        "assert (SCRIPT_LOCATION / 'versions').is_dir()\n"
        "from stowaway.forwarder.deidentify.profiles import chc_basic_tags, dicom_basic\n"
        "assert len(chc_basic_tags()) == 286 and len(dicom_basic().exact) > 400\n"
        "from stowaway.api.v1 import CONSOLE\n"
        "for asset in ('index.html', 'console.js', 'console.css'):\n"
        "    assert (CONSOLE / asset).is_file(), asset\n"
        "assert pathlib.Path(str(CONSOLE)).is_relative_to(pathlib.Path(stowaway.__file__).parent)\n"
        "print(pathlib.Path(stowaway.db.queue.__file__).resolve())\n"
    )
    run = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).is_relative_to(python.parent.parent.resolve())
    migrate = subprocess.run(
        [str(python), "-m", "stowaway.cli", "migrate", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    assert (tmp_path / "data" / "queue.db").is_file()
