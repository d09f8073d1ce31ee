"""A write cut short by a full disk never becomes a spool file, nor a Success.

``write()`` may write fewer bytes than asked when the file system fills up; the
next call fails with ENOSPC, but a short last write has no next call. Both
ways of making a spool file (the receiver's streamed incoming file, and the
spool's copy behind a new file meta) write in loops and compare the file's
size with what they received before renaming it. Through the receiver, the
sender gets 0xA700 with an ErrorComment, and no row or file stays behind.
The spool lives on the small tmpfs of the disk-full scenario.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from stowaway.db.models import utcnow
from stowaway.db.part10 import part10_header
from stowaway.db.spool import Spool
from stowaway.receiver.incoming import IncomingFile
from stowaway.receiver.status import OUT_OF_RESOURCES
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    SUCCESS,
    Corpus,
    new_ae,
    nodelay,
    partial_files,
    queue_rows,
    spool_files,
)
from tests.durability.test_disk_full import SmallDisk, small_disk

__all__ = ["small_disk"]  # the fixture, shared with the disk-full scenario

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::ResourceWarning")]

#: Free space left on the small disk: less than one instance below.
LEAVE = 40 * 1024
HEADER = part10_header(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)


@pytest.fixture
def db_url(sqlite_db_url: str) -> str:
    # The queue database stays on the ordinary disk: only the spool fills up.
    return sqlite_db_url


@pytest.fixture
def full_spool(small_disk: SmallDisk) -> Spool:
    if not small_disk.mounted:
        pytest.skip("needs a small file system (mount -t tmpfs)")
    spool = Spool(small_disk.path)
    spool.prepare()
    small_disk.fill(LEAVE)
    return spool


def leftovers(spool: Spool) -> list[Path]:
    return partial_files(spool.root) + spool_files(spool.root)


def test_the_spool_copy_never_renames_a_short_file(full_spool: Spool) -> None:
    # One piece, bigger than the space left: the only write() is the short one.
    source = io.BytesIO(b"\x5a" * (LEAVE * 3))
    with pytest.raises(OSError):
        full_spool.write(HEADER, source, utcnow())
    assert leftovers(full_spool) == []


def test_the_incoming_file_never_finishes_short(full_spool: Spool) -> None:
    incoming = IncomingFile(str(full_spool.incoming_dir))
    incoming.start(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    incoming.write(b"\x5a" * (LEAVE * 3))
    with pytest.raises(OSError):
        incoming.finish()
    incoming.close()
    Path(incoming.name).unlink()  # as pynetdicom does after the handler
    assert leftovers(full_spool) == []


def test_a_full_disk_mid_instance_answers_out_of_resources(
    stowaway: StowawayFactory, small_disk: SmallDisk, db_url: str
) -> None:
    if not small_disk.mounted:
        pytest.skip("needs a small file system (mount -t tmpfs)")
    proc = stowaway("receive", "--spool-dir", str(small_disk.path), "--min-free-disk", "0")
    corpus = Corpus("short-write", 2, rows=256, cols=256)  # 128 KiB of pixels each
    small_disk.fill(LEAVE)
    ae = new_ae("FILLER")
    try:
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
        assert assoc.is_established
        nodelay(assoc)
        refused = assoc.send_c_store(corpus.dataset(0))
        assert int(refused.Status) == OUT_OF_RESOURCES
        assert str(refused.ErrorComment).startswith("Spool write failed")
        assert queue_rows(db_url) == []
        assert leftovers(Spool(small_disk.path)) == []
        # The same association stores once there is room again.
        small_disk.free()
        assert int(assoc.send_c_store(corpus.dataset(1)).Status) == SUCCESS
        assoc.release()
    finally:
        ae.shutdown()
    assert [r.sop_instance_uid for r in queue_rows(db_url)] == [corpus.uid(1)]
    assert len(spool_files(small_disk.path)) == 1
    assert partial_files(small_disk.path) == []
    assert proc.stop() == 0
