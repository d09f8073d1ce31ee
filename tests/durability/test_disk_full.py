"""A full disk under the spool: failure status, no row, no partial file, recovery.

The spool lives on a small tmpfs (``mount -t tmpfs -o size=2m``; we run as root,
so permissions would not stop a write). A ballast file fills it to within a few
instances of full. Senders get ``0xA700`` (never a Success, never an aborted
association), no row is written for a refused instance and no partial file
stays behind; when the ballast is deleted the same receiver, without a restart,
stores what the senders send again. Where ``mount`` is not allowed the same is
done with a file-size limit (``RLIMIT_FSIZE``) on the stowaway process.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stowaway.db.models import Status
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    Ledger,
    NoDestination,
    ScenarioFactory,
    Target,
    end,
    join_all,
    partial_files,
    queue_rows,
    spool_files,
    start_senders,
)
from tests.support.processes import StowawayProcess

pytestmark = [
    pytest.mark.timeout(180),
    # pynetdicom leaks a socket for each refused connection (a paused receiver)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture
def db_url(sqlite_db_url: str) -> str:
    # The queue database stays on the ordinary disk: only the spool fills up.
    return sqlite_db_url


@dataclass
class SmallDisk:
    """The spool's file system: a 2 MiB tmpfs, or a file-size limit where mounting fails."""

    path: Path
    mounted: bool
    ballast: Path

    def fill(self, leave: int) -> None:
        """Fill the file system with ballast, leaving about ``leave`` bytes free."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 4096):
                    pass
        finally:
            os.close(fd)
        size = self.ballast.stat().st_size
        os.truncate(self.ballast, max(0, size - leave))

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "smalldisk"
    path.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield SmallDisk(path / "spool", mounted, path / "ballast")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def limit_file_size(proc: StowawayProcess, limit: int) -> None:
    assert proc.proc is not None
    resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("guard", ["enospc", "min-free-disk"])
def test_full_spool_refuses_then_recovers(
    stowaway: StowawayFactory,
    small_disk: SmallDisk,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
    guard: str,
) -> None:
    name = f"disk-full-{guard}-{'tmpfs' if small_disk.mounted else 'rlimit'}"
    run = scenario(name, db_url, spool_dir=small_disk.path)
    if small_disk.mounted:
        corpus = run.corpus(40)  # ~8.5 KiB each
        # enospc: nothing stops a write but the file system itself;
        # min-free-disk: stowaway refuses before the disk is full.
        min_free = "0" if guard == "enospc" else "256KiB"
    else:
        if guard == "min-free-disk":
            pytest.skip("needs a small file system (mount -t tmpfs)")
        corpus = run.corpus(12, rows=512, cols=512)  # ~512 KiB each
        min_free = "0"
    proc = stowaway("receive", "--spool-dir", str(small_disk.path), "--min-free-disk", min_free)
    target = Target(proc.port)

    if small_disk.mounted:
        leave = 40 * 1024 if guard == "enospc" else 256 * 1024 + 40 * 1024
        small_disk.fill(leave)
    else:
        limit_file_size(proc, 256 * 1024)

    # Phase 1: the disk is full. Senders try for a few seconds, then stop.
    senders = start_senders(
        corpus, target, ledger, 2, deadline=time.monotonic() + 4, retry_delay=0.2
    )
    join_all(senders, 30)
    acked_full = set(ledger.acked)
    statuses_full = dict(ledger.statuses)
    assert statuses_full.get("0xA700", 0) > 0, statuses_full
    assert "none" not in statuses_full, "an association was aborted instead of answered"
    assert len(acked_full) < corpus.count
    rows = queue_rows(db_url)
    assert {r.sop_instance_uid for r in rows} == acked_full  # no row for a refused instance
    assert len(spool_files(small_disk.path)) == len(rows)
    assert partial_files(small_disk.path) == []

    # Phase 2: space comes back; the same process stores everything sent again.
    if small_disk.mounted:
        small_disk.free()
    else:
        limit_file_size(proc, resource.RLIM_INFINITY)
    unacked = [i for i in range(corpus.count) if corpus.uid(i) not in acked_full]
    retry = start_senders(
        corpus, target, ledger, 2, deadline=time.monotonic() + 60, indices=unacked
    )
    assert join_all(retry, 90) == 0
    assert proc.proc is not None and proc.proc.poll() is None
    end(proc)
    report = run.check(NoDestination(), acked_while_full=len(acked_full))
    assert report.waiting_pending == corpus.count
    assert all(r.status == Status.PENDING for r in queue_rows(db_url))
    assert partial_files(small_disk.path) == []
    assert len(spool_files(small_disk.path)) == corpus.count
