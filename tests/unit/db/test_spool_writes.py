"""Spool writes survive short writes, and never rename a file shorter than its data."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from stowaway.db.models import utcnow
from stowaway.db.spool import Spool, file_sha256, write_all


def at_most(limit: int) -> Callable[[int, bytes], int]:
    """An ``os.write`` that writes no more than ``limit`` bytes per call."""
    real = os.write

    def write(fd: int, data: bytes) -> int:
        return real(fd, bytes(memoryview(data)[:limit]))

    return write


def test_short_writes_still_write_everything(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(300_000)
    monkeypatch.setattr(os, "write", at_most(4097))
    spooled = spool.write(b"HEADER", io.BytesIO(data), utcnow())
    path = spool.absolute(spooled.relative_path)
    assert path.read_bytes() == b"HEADER" + data
    assert spooled.size_bytes == len(data) + 6
    assert spooled.sha256 == file_sha256(path)


def test_a_write_that_makes_no_progress_is_out_of_space(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as raised:
        spool.write(b"HEADER", io.BytesIO(b"x" * 1000), utcnow())
    assert raised.value.errno == errno.ENOSPC
    assert list(spool.tmp_dir.iterdir()) == []
    assert list(spool.iter_files()) == []


def test_write_all_loops_until_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", at_most(3))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, bytearray(b"0123456789"))
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
