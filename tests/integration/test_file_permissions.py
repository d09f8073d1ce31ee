"""Everything stowaway writes is owner-only: the queue database (and -wal/-shm), the spool."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct
from tests.support.processes import dcmsend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """The default embedded SQLite queue, inside the data directory, created by stowaway."""
    yield sqlite_url(tmp_path / "data")


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Start stowaway from a shell whose umask lets everyone read new files."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_and_spool_are_owner_only(
    stowaway: StowawayFactory, tmp_path: Path, permissive_umask: None
) -> None:
    proc = stowaway("receive")
    assert dcmsend(proc.port, [make_ct(tmp_path / "ct.dcm")]).returncode == 0
    data = proc.data_dir
    database = [data / "queue.db", data / "queue.db-wal", data / "queue.db-shm"]
    assert all(p.exists() for p in database), sorted(os.listdir(data))
    files = [p for p in data.rglob("*") if p.is_file()]
    directories = [data, *(p for p in data.rglob("*") if p.is_dir())]
    assert any(p.suffix == ".dcm" for p in files)
    assert {str(p.relative_to(data)): oct(mode(p)) for p in files if mode(p) & 0o077} == {}
    assert {str(p.relative_to(data)): oct(mode(p)) for p in directories if mode(p) & 0o077} == {}
    assert proc.stop() == 0
