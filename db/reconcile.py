"""Make the spool and the queue agree again after a crash: find, and on request repair.

What can disagree, and why:

* **Orphan spool files** (a file with no row): the receiver crashed between the
  fsync of the file and the commit of its row, or a ``queue purge`` died between
  deleting rows and deleting their files. The sender was never acknowledged (or
  the operator asked for the file to go), so after a grace age such a file is
  deleted by a fix, or turned into a new pending row by adoption. Younger files
  are left alone: a receipt may be between its rename and its commit right now.
* **Leftovers** in ``spool/incoming`` and ``spool/tmp`` older than the grace age:
  partial receipts of associations that died.
* **Broken rows**: a ``pending``, ``failed`` or expired ``in_flight`` row whose
  spool file is missing or does not match its recorded size and SHA-256. A fix
  marks it ``failed`` with that reason (``queue purge`` then removes it).
* **Expired leases**: ``in_flight`` rows whose forwarder died. A running forwarder
  re-claims them by itself; a fix gives them back to ``pending`` at once.

Nothing changes without a fix (or adoption); every change is guarded in SQL, so
reconcile may run while ``serve`` runs. Only rows of the given node are checked
for files (other nodes' files live on other volumes).

:func:`run_reconcile` is what ``stowaway reconcile`` fronts;
:func:`safe_startup_reconcile` is the part ``serve``/``receive`` run at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.filereader import read_file_meta_info
from sqlalchemy.exc import SQLAlchemyError

from stowaway.db.models import DEFAULT_DESTINATION, Status, utcnow
from stowaway.db.part10 import NotDicomError, read_header_uids
from stowaway.db.queue import NewInstance, Queue, QueuedInstance, ReleaseResult
from stowaway.db.spool import Spool, SpoolPathError, file_sha256
from stowaway.text import describe_error, first_line

log = logging.getLogger("stowaway")

#: Rows (or spool paths) read per database round trip while walking the table.
PAGE = 2000
#: Rows whose file reconcile checks: an in-flight row under a live lease is its
#: forwarder's business (it deletes the file once the upload is confirmed).
CHECKED_STATUSES = (Status.PENDING, Status.FAILED, Status.IN_FLIGHT)
#: Rows that make an orphan of the same SOP Instance UID a stale copy (re-sent since).
LIVE_STATUSES = (Status.PENDING, Status.IN_FLIGHT, Status.DONE, Status.UNROUTED)
#: What reconcile writes into ``last_error``; a failed row that already says so is
#: recorded, not a problem any more (``queue purge`` it).
REASON_PREFIX = "reconcile: "


class NotRoutable(Exception):
    """Where an orphan goes cannot be decided from its file alone; the message says why
    and what the operator can do."""


#: The destinations an orphan spool file (its absolute path) goes to, decided from the
#: file as its receipt's routing would have (empty: unrouted). Raises
#: :class:`NotRoutable`. The command layer builds it from the routing rules (``db`` knows
#: no rules); without one, adoption queues for the default destination.
Router = Callable[[Path], tuple[str, ...]]


class DurableState(Protocol):
    """The queue and the spool of one node (the commands' ``State`` is one)."""

    @property
    def queue(self) -> Queue: ...

    @property
    def spool(self) -> Spool: ...


# ---------------------------------------------------------------------- findings


@dataclass
class Orphan:
    """A finished spool file that no row points to."""

    path: str
    size_bytes: int
    age_seconds: float
    action: str = ""  # what --fix/--adopt did, or why not
    fixed: bool = False
    #: with --adopt: where it was queued (empty: unrouted) and its rows
    destinations: tuple[str, ...] = ()
    row_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Adoption:
    """What :func:`adopt` did with one orphan."""

    action: str
    #: its rows, one per destination (none: not adopted)
    row_ids: tuple[int, ...] = ()
    destinations: tuple[str, ...] = ()
    #: not adopted, but the file is a good receipt that only needs an operator's decision:
    #: --fix must not delete it
    keep: bool = False


@dataclass
class BrokenRow:
    """A row whose spool file is missing or does not match its size and SHA-256."""

    row: QueuedInstance
    reason: str
    action: str = ""
    fixed: bool = False


@dataclass
class ExpiredLease:
    """An ``in_flight`` row held past its lease (its forwarder died)."""

    row: QueuedInstance
    action: str = ""
    fixed: bool = False


@dataclass
class Report:
    """What reconcile found and, with --fix/--adopt, what it did."""

    grace_seconds: float
    leftovers: list[Path] = field(default_factory=list)
    leftovers_removed: int = 0
    orphans: list[Orphan] = field(default_factory=list)
    young_orphans: int = 0
    broken: list[BrokenRow] = field(default_factory=list)
    #: failed rows whose last_error already records the file problem
    recorded_broken: int = 0
    expired: list[ExpiredLease] = field(default_factory=list)

    def problems(self) -> int:
        return len(self.leftovers) + len(self.orphans) + len(self.broken) + len(self.expired)

    def remaining(self) -> int:
        """Problems still there after the actions taken."""
        items: list[Orphan | BrokenRow | ExpiredLease] = [
            *self.orphans,
            *self.broken,
            *self.expired,
        ]
        return sum(not i.fixed for i in items) + len(self.leftovers) - self.leftovers_removed


def _files(directory: Path) -> Iterator[Path]:
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_file():
            yield entry


def _age(path: Path, now: float) -> float | None:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return None


def clear_incoming(spool: Spool, older_than: float | None = None) -> int:
    """Delete partial receipts in ``incoming/`` and ``tmp/``; returns how many.

    Their senders were never acknowledged. With ``older_than`` (seconds) only files
    at least that old go, so it is safe while a receiver runs; without it every file
    goes, which is only safe before the receiver starts.
    """
    removed = 0
    now = time.time()
    for directory in (spool.incoming_dir, spool.tmp_dir):
        for leftover in _files(directory):
            age = _age(leftover, now)
            if age is None or (older_than is not None and age < older_than):
                continue
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def find_leftovers(spool: Spool, older_than: float) -> list[Path]:
    """Partial receipts in ``incoming/`` and ``tmp/`` at least ``older_than`` seconds old."""
    now = time.time()
    return [
        leftover
        for directory in (spool.incoming_dir, spool.tmp_dir)
        for leftover in _files(directory)
        if (_age(leftover, now) or 0.0) >= older_than
    ]


def find_orphans(queue: Queue, spool: Spool, grace_seconds: float) -> tuple[list[Orphan], int]:
    """Spool files no row points to: those older than the grace age, and how many younger.

    Files are listed *before* the table is read, so a receipt committing meanwhile
    is at worst a young orphan, never an old one. The table is walked in keyset
    pages, so memory grows with the number of spool files, not of rows.
    """
    now = time.time()
    candidates: dict[str, tuple[int, float]] = {}
    for relative in spool.iter_files():
        try:
            st = (spool.root / relative).stat()
        except FileNotFoundError:
            continue
        candidates[relative] = (st.st_size, now - st.st_mtime)
    if candidates:
        after = 0
        while page := queue.spool_paths_page(after, PAGE):
            for row_id, path in page:
                candidates.pop(path, None)
                after = row_id
    old = [
        Orphan(path, size, age) for path, (size, age) in candidates.items() if age >= grace_seconds
    ]
    return sorted(old, key=lambda o: o.path), len(candidates) - len(old)


def _rows(queue: Queue, node_id: str, statuses: tuple[Status, ...]) -> Iterator[QueuedInstance]:
    after = 0
    while page := queue.rows_page(after, PAGE, statuses, node_id):
        yield from page
        after = page[-1].id


def _quick_verify(spool: Spool, row: QueuedInstance) -> str | None:
    """Like ``Spool.verify`` without reading the file: presence and size only."""
    try:
        path = spool.absolute(row.spool_path)
    except SpoolPathError as exc:
        return str(exc)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "spool file is missing"
    if size != row.size_bytes:
        return f"spool file size {size} != recorded {row.size_bytes}"
    return None


def find_broken(
    queue: Queue, spool: Spool, node_id: str, checksum: bool = True
) -> tuple[list[BrokenRow], int]:
    """Rows whose spool file is missing or corrupt; and how many are already recorded."""
    now = utcnow()
    broken: list[BrokenRow] = []
    recorded = 0
    for row in _rows(queue, node_id, CHECKED_STATUSES):
        if row.status == Status.IN_FLIGHT and (
            row.lease_expires_at is None or row.lease_expires_at >= now
        ):
            continue
        if checksum:
            problem = spool.verify(row.spool_path, row.size_bytes, row.sha256)
        else:
            problem = _quick_verify(spool, row)
        if problem is None:
            continue
        reason = REASON_PREFIX + problem
        if row.status == Status.FAILED and row.last_error == reason:
            recorded += 1
            continue
        broken.append(BrokenRow(row, reason))
    return broken, recorded


def find_expired(queue: Queue, node_id: str) -> list[ExpiredLease]:
    """``node_id``'s ``in_flight`` rows whose lease has expired."""
    now = utcnow()
    return [
        ExpiredLease(row)
        for row in _rows(queue, node_id, (Status.IN_FLIGHT,))
        if row.lease_expires_at is not None and row.lease_expires_at < now
    ]


# ---------------------------------------------------------------------- actions


def adopt(
    queue: Queue, spool: Spool, relative: str, node_id: str, route: Router | None = None
) -> Adoption:
    """Queue an orphan spool file as new pending rows, one for each destination ``route``
    chooses (without ``route``: the default destination); returns what happened.

    Refused (the file is left as it is) when the file is not a readable DICOM file,
    when its SOP Instance UID already has a pending, in-flight, done or unrouted row
    (the sender re-sent it after the crash, so this copy is stale), or when ``route``
    cannot decide without what only the association knew (``keep``).
    """
    path = spool.absolute(relative)
    try:
        uids = read_header_uids(path)
        meta = read_file_meta_info(path)
        transfer_syntax = str(meta.TransferSyntaxUID)
        sop_instance_uid = uids.sop_instance_uid or str(meta.MediaStorageSOPInstanceUID)
        sop_class_uid = uids.sop_class_uid or str(meta.MediaStorageSOPClassUID)
    except (NotDicomError, OSError, AttributeError, ValueError) as exc:
        return Adoption(f"not adopted: unreadable ({first_line(exc, 120)})")
    if not sop_instance_uid or not transfer_syntax:
        return Adoption("not adopted: no SOP Instance UID or transfer syntax in the file")
    live = [r for r in queue.find_by_sop(sop_instance_uid) if r.status in LIVE_STATUSES]
    if live:
        return Adoption(
            f"not adopted: already queued as row {live[-1].id} ({live[-1].status.value})"
        )
    try:
        destinations = route(path) if route is not None else (DEFAULT_DESTINATION,)
    except NotRoutable as exc:
        return Adoption(f"not adopted: {exc}", keep=True)
    result = queue.enqueue(
        NewInstance(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=uids.study_instance_uid,
            series_instance_uid=uids.series_instance_uid,
            transfer_syntax_uid=transfer_syntax,
            calling_aet="",
            peer_address="reconcile --adopt",
            spool_path=relative,
            size_bytes=path.stat().st_size,
            sha256=file_sha256(path),
            node_id=node_id,
            destinations=destinations,
        )
    )
    for replaced in result.replaced_spool_paths:
        if replaced != relative:
            # A copy arrived between our look-up and the insert: one pending row, as always.
            spool.remove(replaced)
    ids = result.ids or (result.id,)
    rows = f"row {ids[0]}" if len(ids) == 1 else "rows " + ", ".join(map(str, ids))
    where = (
        "for " + ", ".join(destinations)
        if destinations
        else "unrouted (no rule matched and no default)"
    )
    return Adoption(f"adopted as {rows} {where}", ids, destinations)


def _looks_unmounted(spool: Spool, report: Report) -> bool:
    """Rows expect files but the spool holds none at all: more likely a volume that is
    not mounted (or the wrong --spool-dir) than every file lost."""
    missing = sum(b.reason.endswith("spool file is missing") for b in report.broken)
    return missing > 0 and next(spool.iter_files(), None) is None


def fix(
    report: Report,
    queue: Queue,
    spool: Spool,
    *,
    node_id: str,
    delete: bool,
    adopt_orphans: bool,
    empty_spool_ok: bool = False,
    route: Router | None = None,
) -> None:
    """Apply the repairs to what ``report`` found, recording each action in it.

    Adopted orphans are queued where ``route`` says (see :func:`adopt`)."""
    if delete:
        for leftover in report.leftovers:
            leftover.unlink(missing_ok=True)
            report.leftovers_removed += 1
        unmounted = not empty_spool_ok and _looks_unmounted(spool, report)
        for broken in report.broken:
            if unmounted:
                broken.action = (
                    "left alone: the spool holds no files at all (volume not mounted? wrong "
                    "--spool-dir?); if they are really lost, run again with --empty-spool-ok"
                )
                continue
            changed = queue.mark_file_broken(broken.row.id, broken.row.spool_path, broken.reason)
            # A row that changed meanwhile (forwarded, replaced, re-claimed) is no
            # longer this problem; the next run looks at it afresh.
            broken.action = "marked failed" if changed else "left alone: the row changed meanwhile"
            broken.fixed = True
        ids = [e.row.id for e in report.expired]
        result = queue.release_expired(ids) if ids else ReleaseResult()
        for expired in report.expired:
            if expired.row.id in result.released:
                expired.action = "released to pending"
            elif expired.row.id in result.superseded:
                expired.action = "superseded by a newer pending copy"
            else:
                expired.action = "left alone: re-claimed or settled meanwhile"
            expired.fixed = True
    for orphan in report.orphans:
        refused = ""
        if adopt_orphans:
            adoption = adopt(queue, spool, orphan.path, node_id, route)
            orphan.action = adoption.action
            if adoption.row_ids:
                orphan.fixed = True
                orphan.destinations, orphan.row_ids = adoption.destinations, adoption.row_ids
                continue
            if adoption.keep:
                continue  # a good receipt whose route needs a person: never deleted here
            refused = adoption.action
        if delete:
            spool.remove(orphan.path)
            orphan.action = "deleted" + (f" ({refused})" if refused else "")
            orphan.fixed = True


def run_reconcile(
    state: DurableState,
    *,
    node_id: str,
    grace_seconds: float,
    delete: bool,
    adopt_orphans: bool,
    checksum: bool = True,
    empty_spool_ok: bool = False,
    route: Router | None = None,
) -> Report:
    """Find every disagreement; repair with ``delete`` (--fix) / ``adopt_orphans``
    (queued where ``route`` says; without it, for the default destination)."""
    report = Report(grace_seconds)
    report.leftovers = find_leftovers(state.spool, grace_seconds)
    report.broken, report.recorded_broken = find_broken(state.queue, state.spool, node_id, checksum)
    report.expired = find_expired(state.queue, node_id)
    report.orphans, report.young_orphans = find_orphans(state.queue, state.spool, grace_seconds)
    if delete or adopt_orphans:
        fix(
            report,
            state.queue,
            state.spool,
            node_id=node_id,
            delete=delete,
            adopt_orphans=adopt_orphans,
            empty_spool_ok=empty_spool_ok,
            route=route,
        )
    # The report is the command's output; the log line is the audit trail of changes.
    log.log(
        logging.INFO if delete or adopt_orphans else logging.DEBUG,
        "reconciled",
        extra={
            "leftovers": len(report.leftovers),
            "orphans": len(report.orphans),
            "broken_rows": len(report.broken),
            "expired_leases": len(report.expired),
            "fix": delete,
            "adopt": adopt_orphans,
            "remaining": report.remaining(),
        },
    )
    return report


# ---------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class StartupSummary:
    """What the start-up reconcile removed and counted."""

    leftovers_removed: int
    orphans: int
    missing_files: int


def safe_startup_reconcile(state: DurableState, node_id: str = "") -> StartupSummary:
    """The safe part of reconcile, for ``serve``/``receive`` before the receiver starts.

    Deletes everything in ``spool/incoming`` and ``spool/tmp`` (partial receipts of
    a previous run, never acknowledged: nothing else writes there, and the receiver
    is not listening yet). Then only *counts* spool files with no row and rows of
    ``node_id`` whose file is missing or has the wrong size (no checksums: start-up
    stays fast on a big backlog) and logs them, deleting nothing that a sender was
    told is stored. ``stowaway reconcile`` shows the details and repairs.
    """
    removed = clear_incoming(state.spool)
    try:
        orphans, young = find_orphans(state.queue, state.spool, 0.0)
        broken, _recorded = find_broken(state.queue, state.spool, node_id, checksum=False)
    except (OSError, SQLAlchemyError) as exc:
        # Counting is advice for the operator: it must never keep the receiver down.
        log.warning("startup_reconcile_failed", extra={"error": describe_error(exc)})
        return StartupSummary(removed, 0, 0)
    summary = StartupSummary(removed, len(orphans) + young, len(broken))
    fields = {
        "leftovers_removed": summary.leftovers_removed,
        "orphan_files": summary.orphans,
        "rows_with_missing_files": summary.missing_files,
    }
    if summary.orphans or summary.missing_files:
        log.warning("startup_reconcile", extra={**fields, "hint": "run `stowaway reconcile`"})
    else:
        log.info("startup_reconcile", extra=fields)
    return summary


__all__ = [
    "REASON_PREFIX",
    "Adoption",
    "BrokenRow",
    "DurableState",
    "ExpiredLease",
    "NotRoutable",
    "Orphan",
    "Report",
    "Router",
    "StartupSummary",
    "clear_incoming",
    "run_reconcile",
    "safe_startup_reconcile",
]
