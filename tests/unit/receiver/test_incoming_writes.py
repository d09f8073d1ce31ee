"""The streamed incoming file survives short writes and checks its size before it is used."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from stowaway.db.part10 import part10_header
from stowaway.receiver.incoming import WRITE_CHUNK, IncomingFile


def test_short_writes_still_write_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(memoryview(data)[:5000])))
    incoming = IncomingFile(str(tmp_path))
    incoming.start(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    data = os.urandom(3 * WRITE_CHUNK + 17)
    for start in range(0, len(data), 16384):
        incoming.write(data[start : start + 16384])
    received = incoming.finish()
    incoming.close()
    header = part10_header(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    assert Path(incoming.name).read_bytes() == header + data
    assert received.size_bytes == len(header) + len(data)


def test_a_file_shorter_than_received_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write that claims success for bytes that never reached the file.
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:-1])) + 1)
    incoming = IncomingFile(str(tmp_path))
    incoming.start(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    incoming.write(b"x" * 1000)
    with pytest.raises(OSError) as raised:
        incoming.finish()
    assert raised.value.errno == errno.EIO
    incoming.close()
