"""Reading the header UIDs is bounded in memory and time, whatever comes before them.

A dataset may put a huge undefined-length sequence ahead of its UIDs. The byte
scan walks at most SCAN_LIMIT bytes without making objects, pydicom parses at
most PARSE_LIMIT bytes, and UIDs beyond that are a clear NotDicomError (the
sender gets "cannot understand"), not a parse of the whole sequence in memory.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian

from stowaway.db.part10 import (
    SCAN_LIMIT,
    NotDicomError,
    dataset_offset,
    part10_header,
    read_header_uids,
)

#: Well above what a bounded read needs, well below what parsing the whole sequence took.
MEMORY_LIMIT = 30 * 1024 * 1024
SECONDS_LIMIT = 10.0  # under tracemalloc, on a loaded machine; a whole parse took a minute
UIDS = {
    0x00080016: CTImageStorage,
    0x00080018: "1.2.3.4",
    0x0020000D: "1.2.3",
    0x0020000E: "1.2.3.5",
}


def dataset_with_sequence(items: int, big_endian: bool = False) -> bytes:
    """(0008,0005), an undefined-length (0008,0006) of ``items`` small items, the UIDs."""
    order = ">" if big_endian else "<"

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack(f"{order}HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    def marker(element_number: int, length: int) -> bytes:
        return struct.pack(f"{order}HHI", 0xFFFE, element_number, length)

    item = marker(0xE000, 0xFFFFFFFF) + element(0x00080100, b"SH", b"EN") + marker(0xE00D, 0)
    sequence = struct.pack(f"{order}HH2sHI", 0x0008, 0x0006, b"SQ", 0, 0xFFFFFFFF)
    parts = [element(0x00080005, b"CS", b"ISO_IR 100"), sequence, item * items, marker(0xE0DD, 0)]
    for tag, uid in UIDS.items():
        value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
        parts.append(element(tag, b"UI", value))
    return b"".join(parts)


def part10_file(tmp_path: Path, body: bytes, syntax: str = ExplicitVRLittleEndian) -> Path:
    path = tmp_path / "seq.dcm"
    path.write_bytes(part10_header(CTImageStorage, "1.2.3.4", syntax) + body)
    return path


def bounded(call: object) -> object:
    """Run ``call``; assert it stayed within the memory and time limits; return its result."""
    assert callable(call)
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = call()
    except NotDicomError as exc:
        result = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    seconds = time.monotonic() - started
    assert peak < MEMORY_LIMIT and seconds < SECONDS_LIMIT, (peak, seconds)
    return result


@pytest.mark.parametrize("with_head", [True, False], ids=["received", "file-only"])
def test_uids_behind_a_huge_sequence_fail_clearly_within_bounds(
    tmp_path: Path, with_head: bool
) -> None:
    body = dataset_with_sequence(300_000)  # about 7.8 MB of sequence
    path = part10_file(tmp_path, body)
    head = body[: 128 * 1024] if with_head else None
    outcome = bounded(lambda: read_header_uids(path, head, ExplicitVRLittleEndian))
    assert isinstance(outcome, NotDicomError)
    assert "not within the first" in str(outcome)


def test_uids_behind_a_long_sequence_within_the_scan_limit_are_found(tmp_path: Path) -> None:
    body = dataset_with_sequence(30_000)  # about 780 KB: past the head, within SCAN_LIMIT
    assert 128 * 1024 < len(body) < SCAN_LIMIT
    path = part10_file(tmp_path, body)
    uids = bounded(lambda: read_header_uids(path, body[: 128 * 1024], ExplicitVRLittleEndian))
    assert not isinstance(uids, NotDicomError), uids
    assert (uids.sop_instance_uid, uids.series_instance_uid) == ("1.2.3.4", "1.2.3.5")  # type: ignore[attr-defined]


def test_pydicom_parses_only_a_bounded_prefix(tmp_path: Path) -> None:
    # Big endian is never scanned: pydicom alone decides, on a bounded prefix.
    body = dataset_with_sequence(300_000, big_endian=True)
    path = part10_file(tmp_path, body, ExplicitVRBigEndian)
    with path.open("rb") as f:
        assert dataset_offset(f) == len(path.read_bytes()) - len(body)
    outcome = bounded(lambda: read_header_uids(path, body[: 128 * 1024], ExplicitVRBigEndian))
    assert isinstance(outcome, NotDicomError)
    assert "not within the first" in str(outcome)
