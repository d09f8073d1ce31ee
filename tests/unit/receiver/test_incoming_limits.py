"""An incoming file gives up as soon as its dataset crosses a limit, not after it arrived."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from stowaway.receiver.incoming import WRITE_CHUNK, IncomingFile, InstanceLimits, InstanceRefused


def started(tmp_path: Path, limits: InstanceLimits, aborts: list[str]) -> IncomingFile:
    f = IncomingFile(str(tmp_path), limits, lambda: aborts.append("abort"))
    f.start(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    return f


def test_crossing_the_size_limit_deletes_the_file_and_aborts_once(tmp_path: Path) -> None:
    aborts: list[str] = []
    f = started(tmp_path, InstanceLimits(max_instance_size=3 * WRITE_CHUNK), aborts)
    for _ in range(3):
        f.write(b"\0" * WRITE_CHUNK)  # exactly at the limit: fine
    assert aborts == [] and Path(f.name).exists()
    f.write(b"\0")
    assert aborts == ["abort"]
    assert not Path(f.name).exists()
    f.write(b"\0" * WRITE_CHUNK)  # the rest of the dataset is dropped, no second abort
    assert aborts == ["abort"]
    with pytest.raises(InstanceRefused):
        f.finish()
    f.close()


def test_falling_below_the_free_space_floor_aborts(tmp_path: Path) -> None:
    aborts: list[str] = []
    # A floor no real disk meets: the first piece written crosses it.
    f = started(tmp_path, InstanceLimits(min_free_disk=2**62), aborts)
    f.write(b"\0" * (WRITE_CHUNK - 1000))
    assert aborts == []  # nothing written to the disk yet
    f.write(b"\0" * 1000)
    assert aborts == ["abort"] and not Path(f.name).exists()
    f.close()
