"""Group commit: one directory fsync and one transaction for instances arriving together.

Each association's handler fsyncs its own file and renames it into the spool
(those run in parallel: fsync releases the GIL). What remains before it may
answer is the fsync of the spool directory and the commit of its row, and with
SQLite and ``synchronous=FULL`` the commit is itself an fsync of the WAL. When
several associations store at once, one fsync of each directory and one
transaction cover all of them.

There is no committer thread: the first handler to take the commit lock
commits every instance waiting at that moment, its own included; handlers
that queued meanwhile find their instance committed when they get the lock,
or commit the next group. A lone association therefore pays nothing for the
mechanism, and nobody is ever answered before its own row is committed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from stowaway.db.queue import EnqueueResult, NewInstance, Queue
from stowaway.db.spool import Spool


@dataclass
class _Pending:
    new: NewInstance
    #: the spool file's directory still needs an fsync
    sync_dir: bool
    result: EnqueueResult | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


@dataclass
class GroupStats:
    """Counts for tests and the benchmark: how well grouping works."""

    groups: int = 0
    instances: int = 0
    largest: int = 0


class GroupCommit:
    """Makes spooled instances durable in groups (see the module docstring)."""

    def __init__(self, queue: Queue, spool: Spool, max_group: int = 64) -> None:
        self.queue = queue
        self.spool = spool
        self.max_group = max_group
        self.stats = GroupStats()
        self._waiting: list[_Pending] = []
        self._waiting_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def enqueue(self, new: NewInstance, *, sync_dir: bool) -> EnqueueResult:
        """Return once ``new``'s row is committed (and its directory fsynced if asked).

        Raises what the fsync (``OSError``) or the database (``SQLAlchemyError``)
        raised for this instance; the caller answers a failure and removes its file.
        """
        item = _Pending(new, sync_dir)
        with self._waiting_lock:
            self._waiting.append(item)
        while True:
            with self._commit_lock:
                if item.done:
                    break
                with self._waiting_lock:
                    group = self._waiting[: self.max_group]
                    del self._waiting[: self.max_group]
                self._commit(group)
            if item.done:
                break
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _commit(self, group: Sequence[_Pending]) -> None:
        try:
            ready = self._sync_directories(group)
            if ready:
                try:
                    results = self.queue.enqueue_many([p.new for p in ready])
                except (IntegrityError, DataError):
                    # Raised by a statement, so the transaction was rolled back:
                    # commit the ones that can be committed, one bad row must not
                    # fail the others. Any other error (a connection lost during
                    # COMMIT) may have committed the group: it goes to every
                    # handler, which then checks whether its row exists.
                    self._one_by_one(ready)
                else:
                    for pending, result in zip(ready, results, strict=True):
                        pending.result = result
        except BaseException as exc:  # never leave a waiting handler without an answer
            for pending in group:
                if pending.result is None and pending.error is None:
                    pending.error = exc
        finally:
            for pending in group:
                pending.done = True
            self.stats.groups += 1
            self.stats.instances += len(group)
            self.stats.largest = max(self.stats.largest, len(group))

    def _sync_directories(self, group: Sequence[_Pending]) -> list[_Pending]:
        """fsync each directory once; returns the instances whose directory is durable."""
        failed: dict[str, OSError] = {}
        synced: set[str] = set()
        for pending in group:
            if not pending.sync_dir:
                continue
            directory = pending.new.spool_path.rpartition("/")[0]
            if directory in synced or directory in failed:
                continue
            try:
                self.spool.sync_directory(pending.new.spool_path)
                synced.add(directory)
            except OSError as exc:
                failed[directory] = exc
        ready = []
        for pending in group:
            error = failed.get(pending.new.spool_path.rpartition("/")[0])
            if pending.sync_dir and error is not None:
                pending.error = error
            else:
                ready.append(pending)
        return ready

    def _one_by_one(self, group: Sequence[_Pending]) -> None:
        for pending in group:
            try:
                pending.result = self.queue.enqueue(pending.new)
            except SQLAlchemyError as exc:
                pending.error = exc
