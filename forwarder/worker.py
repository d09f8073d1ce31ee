"""The forwarder: claims due rows, uploads them with STOW-RS, records each outcome.

``Forwarder`` runs ``max_workers`` threads, of which ``Concurrency`` lets as
many upload at once as pays (from ``workers`` up to ``max_workers``; see
``forwarder/concurrency.py``), each a small loop:

1. if the destination is blocked (401/403), wait for the next probe time;
2. claim a batch of due rows with a lease (``Queue.claim_batch``);
3. check each spool file against its recorded size and checksum;
4. upload them, grouped by study and bounded by count and bytes;
5. apply each instance's outcome (``OUTCOME_ACTIONS`` below).

A lease keeper thread extends the leases of rows being uploaded, so a slow
upload is never taken over by another forwarder, while the rows of a crashed
forwarder become claimable again once their lease runs out. On ``stop`` the
workers finish the upload in hand (within the grace period) and give back
every row they still hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from stowaway.batch_limits import BATCH_MAX_BYTES, BATCH_MAX_INSTANCES
from stowaway.db.models import DestinationState, Status, utcnow
from stowaway.db.queue import Queue, QueuedInstance, TransitionError
from stowaway.db.spool import Spool, SpoolPathError
from stowaway.forwarder.concurrency import Concurrency
from stowaway.forwarder.outbound import OutboundPipeline, PreparedInstance, RedactionError
from stowaway.forwarder.outcome import InstanceOutcome, OutcomeKind
from stowaway.forwarder.retry import RetryPolicy
from stowaway.forwarder.stow import UploadItem
from stowaway.text import describe_error

log = logging.getLogger("stowaway.forwarder")

#: Pause after a partial batch, so the next claim finds several instances.
BATCH_LINGER = 0.2
#: Seconds the mean size of the pending rows is used before it is read again.
PENDING_MEAN_AGE = 5.0
#: A row received less than this many seconds ago is still arriving.
ARRIVING = 1.0
#: How often a worker that gives way to the receiver looks again.
RECEIVING_RECHECK = 0.1
#: Rows per query of the done-file sweep, and queries of each kind per pass.
SWEEP_PAGE = 1000
SWEEP_PAGES = 10
_BEGINNING = datetime.min.replace(tzinfo=UTC)

#: The status of a destination that rate-limits us ("Too Many Requests").
THROTTLED = 429

#: What each outcome does to the row (the README has the same table).
OUTCOME_ACTIONS: dict[OutcomeKind, str] = {
    OutcomeKind.SUCCESS: "done; spool file deleted (or kept for --keep-done)",
    OutcomeKind.CONFLICT: "failed with the reason, unless --on-conflict overwrite: "
    "delete the stored instance, upload again once (superseded instead when a newer "
    "copy of the instance exists)",
    OutcomeKind.TRANSIENT: "pending again at now + backoff (Retry-After honoured); "
    "failed after --max-attempts",
    OutcomeKind.BLOCKED: "row given back untouched (no attempt counted); "
    "destination paused and probed with backoff",
    OutcomeKind.PERMANENT: "failed at once with the HTTP status and message",
}


class DeliveryClient(Protocol):
    """What a worker sends with: a STOW-RS client, or a DIMSE one (``DimseClient``)."""

    def store(self, items: Sequence[UploadItem]) -> dict[str, InstanceOutcome]: ...

    def probe(self) -> InstanceOutcome: ...

    def delete_instance(self, study: str, series: str, sop: str) -> InstanceOutcome: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ForwarderConfig:
    #: the destination's name: the rows it claims, the state it records
    destination: str
    #: where it is, for operators (a URL, or dimse://AET@host:port)
    destination_url: str = ""
    #: uploads at once to start with
    workers: int = 4
    #: at most this many (None: ``workers``, a fixed number)
    max_workers: int | None = None
    batch_max_instances: int = BATCH_MAX_INSTANCES
    batch_max_bytes: int = BATCH_MAX_BYTES
    lease: timedelta = timedelta(minutes=5)
    poll_interval: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    overwrite_on_conflict: bool = False
    #: keep forwarded instances' spool files this long (zero: delete at once)
    keep_done: timedelta = timedelta(0)
    node_id: str = ""
    #: ``serve``: while the receiver is taking instances in, uploads wait so
    #: that senders get the CPU, for at most this long into one transfer; then
    #: one worker uploads until the transfer ends. Zero: never wait.
    sender_first: timedelta = timedelta(seconds=10)


@dataclass(frozen=True)
class UploadReport:
    """One STOW-RS request's result for one outcome class, for metrics."""

    outcome: str
    instances: int
    size_bytes: int
    seconds: float
    #: the destination's name
    destination: str


@dataclass(frozen=True)
class FailureReport:
    """A delivery the forwarder marked ``failed`` (it waits for an operator), for metrics.

    ``outcome`` is the class that ended it: ``permanent``, ``conflict``, or
    ``transient`` when it gave up after ``--max-attempts``.
    """

    destination: str
    outcome: str


class _Stopping(Exception):
    pass


class Forwarder:
    """Drains the queue to one destination with a pool of worker threads of its own, so
    a destination that is down, blocked or slow never holds back another's."""

    def __init__(
        self,
        config: ForwarderConfig,
        queue: Queue,
        spool: Spool,
        client_factory: Callable[[], DeliveryClient],
        on_upload: Callable[[UploadReport], None] = lambda _r: None,
        on_destination: Callable[[bool, str | None], None] = lambda _b, _r: None,
        receiving_for: Callable[[], float | None] = lambda: None,
        on_failed: Callable[[FailureReport], None] = lambda _r: None,
        outbound: OutboundPipeline | None = None,
    ) -> None:
        self.config = config
        #: this destination's redaction and compression (None: instances go as received)
        self.outbound = outbound
        self.queue = queue
        self.spool = spool
        self.client_factory = client_factory
        self.on_upload = on_upload
        self.on_destination = on_destination
        self.on_failed = on_failed
        # How long the receiver of this process (``serve``) has been taking
        # instances in without a pause, or None when it is idle.
        self.receiving_for = receiving_for
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held: dict[str, set[int]] = {}  # owner -> row ids it holds
        self._held_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        # Failed probes in a row (sets the probe backoff), and whether the last
        # look at the destinations table saw it blocked.
        self._blocked_since_probe = 0
        self._seen_blocked = False
        # Workers whose last queue call failed: a COMMIT may have reached the
        # database without its answer reaching us (see _release_unknown).
        self._unsure: set[str] = set()
        # The mean size of this destination's pending rows, and when it was read
        # (monotonic): it sets how many rows a claim takes (_claim_limit).
        self._pending_mean: tuple[float, float] | None = None
        self.concurrency = Concurrency(config.workers, self.max_workers, name=config.destination)

    @property
    def max_workers(self) -> int:
        return max(self.config.workers, self.config.max_workers or self.config.workers)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self.outbound is not None:
            self.outbound.clear_leftovers(self.config.lease.total_seconds())
        for index in range(self.max_workers):
            owner = f"{self.name}:{index}"
            thread = threading.Thread(
                target=self._run_worker,
                args=(owner, index),
                name=f"forwarder-{index}",
                daemon=True,
            )
            self._threads.append(thread)
        self._threads.append(
            threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        )
        for thread in self._threads:
            thread.start()
        log.info(
            "forwarder_started",
            extra={
                "destination": self.config.destination,
                "workers": self.config.workers,
                "max_workers": self.max_workers,
            },
        )

    def request_stop(self) -> None:
        """Stop claiming, without waiting (``stop`` waits)."""
        self._stop.set()

    def stop(self, grace: float) -> None:
        """Stop claiming; let uploads in hand finish within ``grace``; give back the rest."""
        self._stop.set()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._held_lock:
            leftovers = {owner: set(ids) for owner, ids in self._held.items() if ids}
        released = 0
        for owner, ids in leftovers.items():
            for row_id in ids:
                try:
                    self.queue.release(row_id, owner)
                    released += 1
                except (TransitionError, SQLAlchemyError):
                    pass  # already settled, or the lease expires by itself
        log.info(
            "forwarder_stopped",
            extra={"destination": self.config.destination, "released": released},
        )

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopping

    # -- the worker loop ----------------------------------------------------

    def _run_worker(self, owner: str, index: int) -> None:
        client = self.client_factory()
        try:
            while not self._stop.is_set():
                try:
                    if index >= self.concurrency.limit:
                        # Above the allowed concurrency: idle, without claiming (an
                        # empty queue is polled by ``limit`` workers, not by all).
                        self._sleep(RECEIVING_RECHECK)
                    elif self._gives_way(index):
                        self._sleep(RECEIVING_RECHECK)
                    elif not self._work_in_a_slot(owner, client, index):
                        self._sleep(self.config.poll_interval)
                except _Stopping:
                    break
                except SQLAlchemyError as exc:
                    self._unsure.add(owner)
                    log.error(
                        "queue_unavailable",
                        extra={"error": describe_error(exc)},
                    )
                    try:
                        self._sleep(max(self.config.poll_interval, 2.0))
                    except _Stopping:
                        break
                except Exception:  # keep the worker alive; the rows' leases expire
                    log.exception("forwarder_error")
                    try:
                        self._sleep(max(self.config.poll_interval, 2.0))
                    except _Stopping:
                        break
        finally:
            client.close()

    def _gives_way(self, index: int) -> bool:
        """Senders first: whether worker ``index`` waits for the receiver to go idle.

        Uploading costs CPU (ours, and the destination's when it shares the
        machine) that every C-STORE of an ongoing transfer would wait for. A
        transfer longer than ``sender_first`` must not fill the disk, so worker
        0 goes on from then.
        """
        limit = self.config.sender_first.total_seconds()
        busy_for = self.receiving_for() if limit > 0 else None
        if busy_for is None:
            return False
        return index > 0 or busy_for < limit

    def _work_in_a_slot(self, owner: str, client: DeliveryClient, index: int) -> bool:
        """``_work_once`` within one of the uploads ``concurrency`` allows at a time.

        The wait for a slot may be long: a transfer that began meanwhile still
        comes first (``_gives_way`` is asked again; the caller then waits).
        """
        if not self.concurrency.acquire(self._stop):
            raise _Stopping
        try:
            if self._gives_way(index):
                return True
            worked = self._work_once(owner, client)
        finally:
            self.concurrency.release()
        if not worked:
            self.concurrency.starved()
        return worked

    def _work_once(self, owner: str, client: DeliveryClient) -> bool:
        """One claim-upload-record cycle; False when there was nothing to do."""
        if owner in self._unsure:
            self._release_unknown(owner)
            self._unsure.discard(owner)
        probing = False
        state = self.queue.destination(self.config.destination)
        self._seen_blocked = state is not None and state.state == DestinationState.BLOCKED
        if state is not None and state.state == DestinationState.BLOCKED:
            if state.next_probe_at is not None and utcnow() < state.next_probe_at:
                return False
            if not self._probe_lock.acquire(blocking=False):
                return False  # another worker of ours is probing
            probing = True
        try:
            limit = 1 if probing else self._claim_limit()
            batch = self.queue.claim_batch(
                owner, limit, self.config.lease, self.config.node_id, self.config.destination
            )
            if not batch:
                if probing:
                    self._record_probe(client.probe())
                return False
            self._hold(owner, [r.id for r in batch])
            try:
                self._forward(owner, client, batch)
            finally:
                self._unhold(owner, [r.id for r in batch])
            if len(batch) < limit and not probing and _arriving(batch):
                # The queue ran dry: instances are arriving one by one (``serve``
                # while a sender sends). Let a batch gather instead of paying a
                # request and two commits per instance, which would also hold
                # the queue's write lock against the receiver. (A batch is also
                # short at the end of a study: then its rows are older, and the
                # next claim takes the next study at once.)
                self._sleep(min(self.config.poll_interval, BATCH_LINGER))
            return True
        finally:
            if probing:
                self._probe_lock.release()

    def _claim_limit(self) -> int:
        """Rows per claim: as many as make one request, ``--batch-max-instances`` or
        fewer, so that their bytes at this destination's mean pending size fit in
        ``--batch-max-bytes``. A claim's requests go one after the other, so a study
        of large instances claimed whole would go as one request at a time; claimed
        a request's worth at a time, it goes as several at once, one per worker.
        The mean comes from the counts the queue keeps, read every few seconds."""
        now = time.monotonic()
        known = self._pending_mean
        if known is None or now - known[1] > PENDING_MEAN_AGE:
            stats = self.queue.stats(self.config.destination)
            count = stats.counts[Status.PENDING]
            mean = stats.bytes[Status.PENDING] / count if count else 0.0
            self._pending_mean = known = (mean, now)
        mean = known[0]
        if mean <= 0:
            return self.config.batch_max_instances
        fit = int(self.config.batch_max_bytes // mean)
        return max(1, min(self.config.batch_max_instances, fit))

    def _release_unknown(self, owner: str) -> None:
        """Give back the rows leased to ``owner`` that it does not know it holds.

        A claim whose COMMIT reached the database while the connection broke
        leaves rows ``in_flight`` under this worker's lease, and nobody would
        upload them before the lease runs out (``--lease``, 5 minutes by
        default). So after a queue error, and before claiming again, the worker
        gives back every row still leased to it: between two cycles it holds
        none. Raises the queue's error while the database is still away.
        """
        released = 0
        for row_id in self.queue.held_by(owner):
            with contextlib.suppress(TransitionError):
                self.queue.release(row_id, owner)
                released += 1
        if released:
            log.warning("unknown_leases_released", extra={"owner": owner, "released": released})

    def _forward(self, owner: str, client: DeliveryClient, batch: Sequence[QueuedInstance]) -> None:
        intact: list[QueuedInstance] = []
        for row in batch:
            problem = self.spool.verify(row.spool_path, row.size_bytes, row.sha256)
            if problem is None:
                intact.append(row)
            else:
                self._settle(owner, row, InstanceOutcome(OutcomeKind.PERMANENT, problem))
        for group in self._groups(intact):
            if self._stop.is_set():
                # Stopping: finish the request in hand only; give the rest back now.
                for row in group:
                    self._give_back(owner, row)
                continue
            prepared = self._prepare(owner, group)
            try:
                self._send_group(owner, client, [r for r in group if r.id in prepared], prepared)
            finally:
                for one in prepared.values():
                    one.close()

    def _prepare(self, owner: str, group: Sequence[QueuedInstance]) -> dict[int, PreparedInstance]:
        """What goes out for each row: the spool file, or this destination's redacted or
        compressed copy. A row that cannot be redacted is failed here, never sent."""
        prepared: dict[int, PreparedInstance] = {}
        for row in group:
            item = self._item(row)
            if self.outbound is None:
                prepared[row.id] = PreparedInstance(item)
                continue
            try:
                prepared[row.id] = self.outbound.prepare(item, row.id)
            except RedactionError as exc:
                self._settle(
                    owner,
                    row,
                    InstanceOutcome(OutcomeKind.PERMANENT, f"cannot be redacted: {exc}"),
                )
        return prepared

    def _send_group(
        self,
        owner: str,
        client: DeliveryClient,
        group: Sequence[QueuedInstance],
        prepared: dict[int, PreparedInstance],
    ) -> None:
        if not group:
            return
        items = {row.sop_instance_uid: prepared[row.id].item for row in group}
        started = time.perf_counter()
        outcomes = self._store(client, group, items)
        elapsed = time.perf_counter() - started
        self._report(group, outcomes, elapsed)
        self._pace(group, outcomes, elapsed)
        if len(group) > 1:
            self._send_alone(client, group, outcomes, items)
        succeeded: list[QueuedInstance] = []
        for row in group:
            outcome = outcomes[row.sop_instance_uid]
            if outcome.kind == OutcomeKind.CONFLICT and self.config.overwrite_on_conflict:
                if self._superseded(owner, row):
                    continue
                outcome = self._overwrite(client, row, outcome, items[row.sop_instance_uid])
            if outcome.kind == OutcomeKind.SUCCESS:
                succeeded.append(row)
            else:
                self._settle(owner, row, outcome)
        applied = {
            row.id: json.dumps(prepared[row.id].applied, sort_keys=True)
            for row in succeeded
            if prepared[row.id].applied is not None
        }
        self._complete(owner, succeeded, outcomes, applied)

    @staticmethod
    def _store(
        client: DeliveryClient,
        rows: Sequence[QueuedInstance],
        items: dict[str, UploadItem],
    ) -> dict[str, InstanceOutcome]:
        """Send the rows' items; the outcomes by the rows' own SOP Instance UIDs (a
        redacted copy is sent, and answered, under its new one)."""
        sent = [items[row.sop_instance_uid] for row in rows]
        answers = client.store(sent)
        return {
            row.sop_instance_uid: answers[item.sop_instance_uid]
            for row, item in zip(rows, sent, strict=True)
        }

    def _pace(
        self,
        group: Sequence[QueuedInstance],
        outcomes: dict[str, InstanceOutcome],
        seconds: float,
    ) -> None:
        """Tell ``concurrency`` what one request delivered, and whether the destination
        asked us to slow down (a 429, or a Retry-After)."""
        delivered = 0
        throttled = False
        retry_after: float | None = None
        for row in group:
            outcome = outcomes[row.sop_instance_uid]
            if outcome.kind == OutcomeKind.SUCCESS:
                delivered += row.size_bytes
            elif outcome.kind == OutcomeKind.TRANSIENT:
                throttled = throttled or outcome.http_status == THROTTLED
                if outcome.retry_after is not None:
                    retry_after = max(retry_after or 0.0, outcome.retry_after)
        self.concurrency.record(seconds, delivered, throttled=throttled, retry_after=retry_after)

    def _send_alone(
        self,
        client: DeliveryClient,
        group: Sequence[QueuedInstance],
        outcomes: dict[str, InstanceOutcome],
        items: dict[str, UploadItem],
    ) -> None:
        """Upload again, one per request, the instances the answer could not be pinned on.

        A failure without a SOP Instance UID in an answer naming several
        instances, or a 409 naming none, belongs to one of them: sent alone, each
        gets an outcome of its own instead of the whole request retrying for ever.
        """
        for row in group:
            if not outcomes[row.sop_instance_uid].alone:
                continue
            started = time.perf_counter()
            outcome = self._store(client, [row], items)[row.sop_instance_uid]
            self._report([row], {row.sop_instance_uid: outcome}, time.perf_counter() - started)
            outcomes[row.sop_instance_uid] = outcome

    def _complete(
        self,
        owner: str,
        rows: Sequence[QueuedInstance],
        outcomes: dict[str, InstanceOutcome],
        applied: dict[int, str] | None = None,
    ) -> None:
        """Mark the instances the destination confirmed ``done``, in one transaction,
        each with what was applied to the copy it got (``applied``: JSON by row id).

        One commit per request instead of one per instance: with SQLite each
        commit is an fsync, which bounded forwarding of small instances.
        """
        if not rows:
            return
        done = set(self.queue.complete_many([r.id for r in rows], owner, applied))
        for row in rows:
            fields = {
                "row_id": row.id,
                "sop_instance_uid": row.sop_instance_uid,
                "outcome": OutcomeKind.SUCCESS.value,
                "attempt": row.attempts + 1,
                "http_status": outcomes[row.sop_instance_uid].http_status,
            }
            if row.id not in done:
                log.warning(
                    "lease_lost", extra={**fields, "error": "not in_flight under our lease"}
                )
                continue
            log.info("instance_forwarded", extra=fields)
        if not self.config.keep_done:
            self._remove_files(r.spool_path for r in rows if r.id in done)
        if done:
            self._destination_ok()

    def _give_back(self, owner: str, row: QueuedInstance) -> None:
        with contextlib.suppress(TransitionError):
            self.queue.release(row.id, owner)

    def _groups(self, rows: Sequence[QueuedInstance]) -> list[list[QueuedInstance]]:
        """Rows of one study per request, bounded by count and bytes.

        Two copies of one SOP Instance UID never share a request (the client
        refuses that, and the rows would be claimed and refused again for ever):
        the queue does not hand them out together, and if it did they would go
        one request after the other.
        """
        by_study: dict[str, list[QueuedInstance]] = {}
        for row in rows:
            by_study.setdefault(row.study_instance_uid, []).append(row)
        groups: list[list[QueuedInstance]] = []
        for study_rows in by_study.values():
            current: list[QueuedInstance] = []
            size = 0
            for row in study_rows:
                full = len(current) >= self.config.batch_max_instances
                too_big = size + row.size_bytes > self.config.batch_max_bytes
                again = any(r.sop_instance_uid == row.sop_instance_uid for r in current)
                if current and (full or too_big or again):
                    groups.append(current)
                    current, size = [], 0
                current.append(row)
                size += row.size_bytes
            if current:
                groups.append(current)
        return groups

    def _item(self, row: QueuedInstance) -> UploadItem:
        return UploadItem(
            sop_instance_uid=row.sop_instance_uid,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            path=self.spool.absolute(row.spool_path),
            size_bytes=row.size_bytes,
            sop_class_uid=row.sop_class_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
        )

    def _superseded(self, owner: str, row: QueuedInstance) -> bool:
        """Whether a newer copy of ``row`` exists, which closes ``row`` (see the queue).

        Asked before an overwrite: the conflicting instance at the destination
        may be that newer copy, uploaded first; deleting it would leave the
        older version there.
        """
        fields = {"row_id": row.id, "sop_instance_uid": row.sop_instance_uid}
        try:
            newer = self.queue.supersede_if_newer(row.id, owner)
        except TransitionError as exc:
            log.warning("lease_lost", extra={**fields, "error": str(exc)})
            return True
        if newer is None:
            return False
        log.info("instance_superseded", extra={**fields, "newer_row_id": newer})
        return True

    def _overwrite(
        self,
        client: DeliveryClient,
        row: QueuedInstance,
        conflict: InstanceOutcome,
        item: UploadItem,
    ) -> InstanceOutcome:
        # The copy at the destination has the UIDs of what we send (a redacted one, new ones).
        deleted = client.delete_instance(
            item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid
        )
        if deleted.kind != OutcomeKind.SUCCESS:
            return InstanceOutcome(
                deleted.kind,
                f"overwrite: delete failed: {deleted.detail}; conflict was: {conflict.detail}",
                deleted.http_status,
                deleted.retry_after,
            )
        log.info(
            "conflict_overwritten",
            extra={"row_id": row.id, "sop_instance_uid": row.sop_instance_uid},
        )
        return client.store([item])[item.sop_instance_uid]

    # -- recording outcomes ---------------------------------------------------

    def _settle(self, owner: str, row: QueuedInstance, outcome: InstanceOutcome) -> None:
        fields = {
            "row_id": row.id,
            "sop_instance_uid": row.sop_instance_uid,
            "outcome": outcome.kind.value,
            "attempt": row.attempts + 1,
            "http_status": outcome.http_status,
        }
        kind = outcome.kind
        if (
            kind == OutcomeKind.PERMANENT
            and outcome.http_status is not None
            and (outcome.http_status == 404 or 300 <= outcome.http_status < 400)
        ):
            # The upload URL itself is wrong: every instance would fail the same way.
            kind = OutcomeKind.BLOCKED
            outcome = InstanceOutcome(
                kind,
                f"destination answers HTTP {outcome.http_status} to STOW-RS: check "
                f"--dicomweb-url ({outcome.detail})",
                outcome.http_status,
            )
        try:
            if kind == OutcomeKind.SUCCESS:
                self.queue.complete(row.id, owner)
                if not self.config.keep_done:
                    self._remove_files([row.spool_path])
                self._destination_ok()
                log.info("instance_forwarded", extra=fields)
            elif kind == OutcomeKind.BLOCKED:
                self.queue.release(row.id, owner)
                self._destination_blocked(outcome.detail)
            elif kind == OutcomeKind.TRANSIENT:
                attempts = row.attempts + 1
                when = self.config.retry.next_attempt(utcnow(), attempts, outcome.retry_after)
                if when is None:
                    self.queue.fail(
                        row.id, owner, f"gave up after {attempts} attempts: {outcome.detail}"
                    )
                    self.on_failed(FailureReport(self.config.destination, kind.value))
                    log.warning("instance_failed", extra={**fields, "error": outcome.detail})
                else:
                    self.queue.retry(row.id, owner, outcome.detail, when)
                    log.info(
                        "instance_retry",
                        extra={**fields, "error": outcome.detail, "next_attempt_at": when},
                    )
            else:  # CONFLICT, PERMANENT
                self.queue.fail(row.id, owner, outcome.detail)
                self.on_failed(FailureReport(self.config.destination, kind.value))
                log.warning("instance_failed", extra={**fields, "error": outcome.detail})
        except TransitionError as exc:
            # Our lease was lost (e.g. we were paused past it and another forwarder
            # took the row): that forwarder now owns the outcome.
            log.warning("lease_lost", extra={**fields, "error": str(exc)})

    def _report(
        self,
        group: Sequence[QueuedInstance],
        outcomes: dict[str, InstanceOutcome],
        seconds: float,
    ) -> None:
        by_kind: dict[str, tuple[int, int]] = {}
        for row in group:
            kind = outcomes[row.sop_instance_uid].kind.value
            count, size = by_kind.get(kind, (0, 0))
            by_kind[kind] = (count + 1, size + row.size_bytes)
        for kind, (count, size) in by_kind.items():
            self.on_upload(UploadReport(kind, count, size, seconds, self.config.destination))

    # -- destination state ---------------------------------------------------

    def _destination_blocked(self, reason: str) -> None:
        self._blocked_since_probe += 1
        delay = self.config.retry.delay(self._blocked_since_probe)
        next_probe = utcnow() + timedelta(seconds=delay)
        if self.queue.set_destination(
            self.config.destination,
            DestinationState.BLOCKED,
            reason,
            next_probe,
            self.config.destination_url,
        ):
            log.error(
                "destination_blocked",
                extra={"destination": self.config.destination, "reason": reason},
            )
            self.on_destination(True, reason)

    def _destination_ok(self) -> None:
        if self._blocked_since_probe == 0 and not self._seen_blocked:
            return
        self._blocked_since_probe = 0
        self._seen_blocked = False
        if self.queue.set_destination(
            self.config.destination, DestinationState.OK, None, None, self.config.destination_url
        ):
            log.info("destination_unblocked", extra={"destination": self.config.destination})
            self.on_destination(False, None)

    def _record_probe(self, outcome: InstanceOutcome) -> None:
        if outcome.kind == OutcomeKind.SUCCESS:
            self._destination_ok()
        elif outcome.kind in (OutcomeKind.BLOCKED, OutcomeKind.TRANSIENT):
            self._destination_blocked(outcome.detail)

    # -- leases ---------------------------------------------------------------

    def _hold(self, owner: str, ids: Sequence[int]) -> None:
        with self._held_lock:
            self._held.setdefault(owner, set()).update(ids)

    def _unhold(self, owner: str, ids: Sequence[int]) -> None:
        with self._held_lock:
            self._held.get(owner, set()).difference_update(ids)

    def _housekeeping(self) -> None:
        """Extend the leases of rows being uploaded; sweep the files of done rows."""
        interval = max(1.0, self.config.lease.total_seconds() / 3)
        sweep = DoneSweep()
        while not self._stop.wait(interval):
            with self._held_lock:
                held = {owner: list(ids) for owner, ids in self._held.items() if ids}
            try:
                for owner, ids in held.items():
                    self.queue.extend_lease(ids, owner, self.config.lease)
                self._sweep_done(sweep)
            except SQLAlchemyError as exc:
                log.warning("housekeeping_failed", extra={"error": type(exc).__name__})

    def _sweep_done(self, sweep: DoneSweep) -> None:
        """Delete the spool files of done rows closed ``keep_done`` ago or longer.

        Which rows: see docs/design.md ("The done-file sweep"). Forwarded rows
        come in ``forwarded_at`` order after ``sweep.forwarded_until``; rows
        closed without an upload (superseded copies, whose files nothing else
        deletes) are visited by id after ``sweep.unforwarded_after``, starting
        over once the last page is read. At most ``SWEEP_PAGES`` pages of each
        per pass, so lease extensions never wait long for it.
        """
        cutoff = utcnow() - self.config.keep_done
        node = self.config.node_id
        removed = 0
        for _ in range(SWEEP_PAGES):
            batch = self.queue.done_spool_paths(
                sweep.forwarded_until, cutoff, SWEEP_PAGE, node_id=node
            )
            removed += self._remove_files(path for _at, path in batch)
            if len(batch) < SWEEP_PAGE:
                sweep.forwarded_until = cutoff
                break
            sweep.forwarded_until = batch[-1][0]
        for _ in range(SWEEP_PAGES):
            page = self.queue.unforwarded_done_spool_paths(
                sweep.unforwarded_after, cutoff, SWEEP_PAGE, node_id=node
            )
            removed += self._remove_files(path for _id, path in page)
            if len(page) < SWEEP_PAGE:
                sweep.unforwarded_after = 0
                break
            sweep.unforwarded_after = page[-1][0]
        if removed:
            log.info("done_files_expired", extra={"files": removed})

    def _remove_files(self, spool_paths: Iterable[str]) -> int:
        """Delete the spool files that are still there and that no other delivery still
        needs (an instance routed elsewhere too keeps its file until that is done);
        returns how many were deleted."""
        removed = 0
        for spool_path in self.queue.unneeded_files(list(spool_paths)):
            with contextlib.suppress(OSError, SpoolPathError):
                self.spool.absolute(spool_path).unlink()
                removed += 1
        return removed


def _arriving(batch: Sequence[QueuedInstance]) -> bool:
    """Whether the newest row of ``batch`` was received just now (a transfer is on)."""
    newest = max(r.received_at for r in batch)
    return (utcnow() - newest).total_seconds() < ARRIVING


@dataclass
class DoneSweep:
    """Where the done-file sweep of one forwarder process has got to."""

    #: forwarded rows up to this ``forwarded_at`` are swept
    forwarded_until: datetime = _BEGINNING
    #: the next page of rows closed without an upload starts after this id
    unforwarded_after: int = 0
