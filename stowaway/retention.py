"""Upkeep of the queue by the service itself: retention of done rows, counts folded.

``serve`` and ``forward`` run one :class:`QueueUpkeep` thread (``receive`` one that
only folds the counts). Every ``FOLD_INTERVAL`` seconds it folds the counts the
triggers keep (Postgres; see ``Queue.fold_counts``); every ``PASS_INTERVAL`` it
runs a retention pass: the node's done rows closed more than ``--retain-done``
ago are deleted, ``BATCH`` at a time, each batch its own short transaction,
followed by a pause in proportion to the time the batch took (``PAUSE_RATIO``), so
that the claims and the receiver's commits get their turn.
The spool files no remaining row points to are deleted after each batch commits
(nearly all are gone already: the forwarder deletes a file once its rows are
done, or after ``--keep-done``, which ``--retain-done`` may not be shorter than);
the spool's hour directories left empty before the cutoff go too, so that a year
of them does not pile up and a gone file is looked for once per directory.

A stop request ends the loop between two batches: a pass in progress leaves
every row either deleted or untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from stowaway.db.models import utcnow
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool

log = logging.getLogger("stowaway")

#: Rows per retention batch (one transaction).
BATCH = 1000
#: Pause after a batch, as a multiple of the time the batch took, by database. SQLite
#: has one writer at a time: a claim or a receiver's commit waits for the batch to
#: end, so they get the database half of the time. On Postgres they do not wait
#: (other rows; the delete leaves index entries to vacuum), and the pause only
#: leaves the cores to them.
PAUSE_RATIO = {"sqlite": 1.0, "postgresql": 0.25}
#: Seconds between retention passes, and between folds of the counts.
PASS_INTERVAL = 60.0
FOLD_INTERVAL = 1.0
#: Spool directories of hours closer to now than this are never pruned.
RECENT_HOURS = timedelta(hours=2)


@dataclass
class PassReport:
    """What one retention pass did."""

    deleted: int = 0
    files_removed: int = 0
    #: empty hour (day, month, year) directories of the spool removed
    directories_removed: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: stopped by a stop request, or by another process retiring the same rows
    interrupted: bool = False


class QueueUpkeep:
    """The upkeep thread of one process: see the module's docstring."""

    def __init__(
        self,
        queue: Queue,
        spool: Spool,
        *,
        node_id: str = "",
        retain_done: timedelta | None = None,
        batch: int = BATCH,
        pause_ratio: float | None = None,
        pass_interval: float = PASS_INTERVAL,
        fold_interval: float = FOLD_INTERVAL,
        on_retired: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.node_id = node_id
        #: None or zero: keep every done row (only fold the counts)
        self.retain_done = retain_done or None
        self.batch = batch
        self.pause_ratio = (
            PAUSE_RATIO.get(queue.engine.dialect.name, 1.0) if pause_ratio is None else pause_ratio
        )
        self.pass_interval = pass_interval
        self.fold_interval = fold_interval
        self.on_retired = on_retired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="queue-upkeep", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop between two batches (or two folds) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_pass = time.monotonic()  # a first pass at start-up
        while not self._stop.is_set():
            try:
                self.queue.fold_counts()
                if self.retain_done is not None and time.monotonic() >= next_pass:
                    self.run_pass()
                    next_pass = time.monotonic() + self.pass_interval
            except SQLAlchemyError as exc:
                log.warning("queue_upkeep_failed", extra={"error": type(exc).__name__})
            self._stop.wait(self.fold_interval)

    def _prune(self, cutoff: datetime) -> int:
        # Never an hour the receiver may still write into, whatever --retain-done is.
        before = min(cutoff, utcnow() - RECENT_HOURS)
        try:
            return self.spool.prune_empty_directories(before)
        except OSError as exc:
            log.warning("spool_prune_failed", extra={"error": type(exc).__name__})
            return 0

    def run_pass(self) -> PassReport:
        """Delete every done row of this node closed before now minus ``retain_done``."""
        report = PassReport()
        if self.retain_done is None:
            return report
        started = time.monotonic()
        cutoff = utcnow() - self.retain_done
        # Empty hour directories first, so that the files of the rows about to go are
        # looked for once per directory, and only where there can be one.
        report.directories_removed += self._prune(cutoff)
        for forwarded in (True, False):
            after = None
            while not self._stop.is_set():
                batch_started = time.monotonic()
                result = self.queue.retire_done(
                    self.node_id, cutoff, self.batch, forwarded=forwarded, after=after
                )
                if result.busy:
                    report.interrupted = True
                    break
                report.batches += 1
                report.deleted += result.deleted
                report.files_removed += self.spool.remove_if_present(result.unreferenced_paths)
                if result.deleted:
                    self.on_retired(result.deleted)
                after = result.resume_after
                if result.finished:
                    break
                # Give the forwarder's claims and the receiver's commits their turn.
                self._stop.wait((time.monotonic() - batch_started) * self.pause_ratio)
            else:
                report.interrupted = True
            if report.interrupted:
                break
        report.directories_removed += self._prune(cutoff)
        report.seconds = time.monotonic() - started
        if report.deleted or report.interrupted:
            log.info(
                "retention_pass",
                extra={
                    "rows_deleted": report.deleted,
                    "files_removed": report.files_removed,
                    "directories_removed": report.directories_removed,
                    "batches": report.batches,
                    "seconds": round(report.seconds, 3),
                    "interrupted": report.interrupted,
                    "retain_done_seconds": self.retain_done.total_seconds(),
                },
            )
        return report
