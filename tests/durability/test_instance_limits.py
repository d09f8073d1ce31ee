"""One dataset is bounded while it arrives: by --max-instance-size and by the free-space floor.

Crossing either aborts the association (A-ABORT) as the bytes come in, with an
``instance_refused`` line; the partial file is deleted at once, no row is
written, and the volume stays usable: the next association stores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
from tests.support.processes import StowawayProcess
from tests.support.seeding import wait_until

__all__ = ["small_disk"]  # the fixture, shared with the disk-full scenario

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::ResourceWarning")]


@pytest.fixture
def db_url(sqlite_db_url: str) -> str:
    # The queue database stays on the ordinary disk.
    return sqlite_db_url


def send_one(port: int, corpus: Corpus, index: int) -> tuple[int | None, bool]:
    """C-STORE one instance on its own association: (status or None, aborted)."""
    ae = new_ae("BIGSENDER")
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="IMPORTADAPTER")
        assert assoc.is_established
        nodelay(assoc)
        response = assoc.send_c_store(corpus.dataset(index))
        status = int(response.Status) if "Status" in response else None
        if status is None:  # the association ended under the C-STORE: how?
            wait_until(lambda: not assoc.is_alive(), timeout=10)
        aborted = assoc.is_aborted
        if assoc.is_established:
            assoc.release()
        return status, aborted
    finally:
        ae.shutdown()


def assert_refused_and_clean(proc: StowawayProcess, spool: Path, db_url: str, reason: str) -> None:
    wait_until(lambda: partial_files(spool) == [], timeout=10)
    assert queue_rows(db_url) == []
    assert spool_files(spool) == []
    log = proc.log()
    assert "instance_refused sop_instance_uid=" in log and f'reason="{reason}"' in log, log
    assert "association_aborted peer=127.0.0.1" in log


def test_a_dataset_over_the_instance_size_limit_is_aborted(
    stowaway: StowawayFactory, db_url: str
) -> None:
    proc = stowaway("receive", "--max-instance-size", "1MiB")
    big = Corpus("too-big", 1, rows=1024, cols=1024)  # 2 MiB of pixels
    status, aborted = send_one(proc.port, big, 0)
    assert status is None and aborted
    spool = proc.data_dir / "spool"
    assert_refused_and_clean(proc, spool, db_url, "larger than --max-instance-size")
    assert "limit_bytes=1048576" in proc.log()
    # The next association, with an instance under the limit, stores.
    assert send_one(proc.port, Corpus("small-enough", 1), 0) == (SUCCESS, False)
    assert len(queue_rows(db_url)) == 1
    assert proc.stop() == 0


def test_the_free_space_floor_is_enforced_while_a_dataset_arrives(
    stowaway: StowawayFactory, small_disk: SmallDisk, db_url: str
) -> None:
    if not small_disk.mounted:
        pytest.skip("needs a small file system (mount -t tmpfs)")
    proc = stowaway("receive", "--spool-dir", str(small_disk.path), "--min-free-disk", "1MiB")
    # 1.5 MiB free: above the floor when the association starts, below it halfway
    # through a 1 MiB instance.
    small_disk.fill(1536 * 1024)
    free_before = shutil.disk_usage(small_disk.path).free
    status, aborted = send_one(proc.port, Corpus("floor", 1, rows=512, cols=1024), 0)
    assert status is None and aborted
    assert_refused_and_clean(proc, small_disk.path, db_url, "free space below --min-free-disk")
    # The partial file's space is back, and the volume takes the next instance.
    assert shutil.disk_usage(small_disk.path).free >= free_before - 64 * 1024
    assert send_one(proc.port, Corpus("after-floor", 1), 0) == (SUCCESS, False)
    assert len(queue_rows(db_url)) == 1
    assert proc.stop() == 0
