"""Prometheus metrics for ``/metrics``: counts, sizes and timings only.

No label ever carries a UID, an AE title, a peer address or anything from a
dataset: labels are small fixed sets (a C-STORE status class, an upload outcome
class, a queue status, a role) and the configured destination names, so the
series count is bounded and nothing about a patient can leak through monitoring.

The receiver and the forwarder know nothing of Prometheus; the service hands
them the ``on_*`` methods of one :class:`Metrics` as callbacks. Queue depth,
bytes, the oldest pending age and the destination state are read from the
queue database when scraped (:class:`QueueCollector`), cached for a couple of
seconds so that several scrapers cannot turn into a load on the database.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from stowaway import __version__
from stowaway.db.models import DEFAULT_DESTINATION, DestinationState, Status, utcnow
from stowaway.db.queue import Queue, QueueStats
from stowaway.receiver import status as dimse_status
from stowaway.receiver.store import StoreOutcome

if TYPE_CHECKING:  # the receive-only process never loads the forwarder
    from sqlalchemy import Engine

    from stowaway.db.commitments import Recorded
    from stowaway.forwarder.worker import FailureReport, UploadReport
    from stowaway.receiver.commitment_reporter import ReportOutcome

log = logging.getLogger("stowaway")

# ``*_created`` series double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: ``stowaway_instances_received_total{status}``: how each C-STORE was answered.
RECEIVE_STATUSES = ("success", "refused", "rejected")
#: ``outcome`` label of the upload metrics (forwarder/outcome.py's classes).
UPLOAD_OUTCOMES = ("success", "conflict", "transient", "blocked", "permanent")
ASSOCIATION_OUTCOMES = ("accepted", "rejected")
#: ``outcome`` label of ``stowaway_deliveries_failed_total``: what ended a delivery
#: ``failed`` (``transient``: it gave up after --max-attempts).
FAILURE_OUTCOMES = ("permanent", "conflict", "transient")
#: ``role`` label of ``stowaway_info``: what the process runs.
ROLES = ("receiver", "forwarder")
#: ``event`` label of ``stowaway_outbound_events_total`` (forwarder/outbound.py's events).
OUTBOUND_EVENTS = ("transcode_skipped", "redaction_failed")

_CSTORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_UPLOAD_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_UPLOAD_BYTES_BUCKETS = tuple(float(4**n * 16 * 1024) for n in range(10))  # 16 KiB .. 4 GiB


def receive_status_class(code: int) -> str:
    """Map a C-STORE response status to ``success``, ``refused`` or ``rejected``.

    ``refused``: we could not take it now (disk, database, stopping; 0xA7xx,
    0x0110), the sender should retry. ``rejected``: the data itself was refused
    (0xC2xx and anything else), a retry will not help.
    """
    if code == dimse_status.SUCCESS or 0xB000 <= code <= 0xBFFF:
        return "success"
    if 0xA700 <= code <= 0xA7FF or code == dimse_status.PROCESSING_FAILURE:
        return "refused"
    return "rejected"


@dataclass(frozen=True)
class QueueSnapshot:
    """One read of the queue table, as the collector caches it."""

    counts: dict[Status, int]
    bytes: dict[Status, int]
    oldest_pending_received_at: datetime | None
    #: per destination name: whether it is blocked (None: not recorded yet)
    destination_blocked: dict[str, bool | None]
    ok: bool
    #: per destination name: its rows' counts by status, and its oldest pending
    destination_counts: dict[str, dict[Status, int]] = field(default_factory=dict)
    destination_oldest: dict[str, datetime | None] = field(default_factory=dict)


class QueueCollector(Collector):
    """Queue gauges computed at scrape time from ``Queue.stats()``.

    A read is reused for ``max_age`` seconds, and while one read is running
    (a slow database) other scrapes get the previous one instead of queueing
    up behind it. When the database cannot be read, ``stowaway_queue_up`` is 0
    and the other queue gauges are left out rather than reported as zero.
    """

    def __init__(
        self,
        queue: Queue,
        destinations: Sequence[str] = (),
        *,
        max_age: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        # The destinations this process forwards to (their names label the gauges).
        self.destinations = tuple(destinations)
        self.max_age = max_age
        self.clock = clock
        self.reads = 0  # database reads made, for tests of the cache
        self._snapshot: QueueSnapshot | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        # Set by the forwarders' callbacks between reads, so a change shows at once.
        self._blocked_override: dict[str, bool] = {}

    def destination_changed(self, blocked: bool, destination: str) -> None:
        self._blocked_override[destination] = blocked

    def snapshot(self) -> QueueSnapshot | None:
        if self.clock() - self._read_at < self.max_age and self._snapshot is not None:
            return self._snapshot
        if not self._lock.acquire(blocking=False):
            return self._snapshot  # a read is in progress: use the last one
        try:
            self._snapshot = self._read()
            self._read_at = self.clock()
            self._blocked_override = {}
            return self._snapshot
        finally:
            self._lock.release()

    def _read(self) -> QueueSnapshot:
        self.reads += 1
        try:
            # Two reads, whatever the number of rows or destinations: the kept counts
            # (and each destination's oldest pending row), and the destinations' states.
            by_destination = self.queue.stats_by_destination()
            stats = QueueStats.total(list(by_destination.values()))
            states = (
                {d.name: d for d in self.queue.list_destinations()} if self.destinations else {}
            )
            none = QueueStats.total([])
            blocked: dict[str, bool | None] = {}
            counts: dict[str, dict[Status, int]] = {}
            oldest: dict[str, datetime | None] = {}
            for name in self.destinations:
                state = states.get(name)
                # Never recorded: no forwarder has found it refusing (yet).
                blocked[name] = state is not None and state.state == DestinationState.BLOCKED
                # Even with one destination, so that dashboards and alerts need
                # no second form for it.
                of_one = by_destination.get(name, none)
                counts[name] = of_one.counts
                oldest[name] = of_one.oldest_pending_received_at
        except SQLAlchemyError as exc:
            log.warning("metrics_queue_unavailable", extra={"error": type(exc).__name__})
            previous = self._snapshot
            return QueueSnapshot(
                {},
                {},
                None,
                previous.destination_blocked if previous else {},
                ok=False,
            )
        return QueueSnapshot(
            stats.counts,
            stats.bytes,
            stats.oldest_pending_received_at,
            blocked,
            ok=True,
            destination_counts=counts,
            destination_oldest=oldest,
        )

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily(
            "stowaway_queue_up", "1 if the last read of the queue database for metrics succeeded"
        )
        up.add_metric([], 1.0 if snap is not None and snap.ok else 0.0)
        yield up
        if snap is not None and snap.ok:
            depth = GaugeMetricFamily(
                "stowaway_queue_instances", "Queued instances by status", labels=["status"]
            )
            size = GaugeMetricFamily(
                "stowaway_queue_bytes", "Bytes of queued instances by status", labels=["status"]
            )
            for status in Status:
                depth.add_metric([status.value], float(snap.counts.get(status, 0)))
                size.add_metric([status.value], float(snap.bytes.get(status, 0)))
            yield depth
            yield size
            age = GaugeMetricFamily(
                "stowaway_queue_oldest_pending_age_seconds",
                "Age of the oldest pending instance (0 when none is pending)",
            )
            oldest = snap.oldest_pending_received_at
            age.add_metric([], max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
            yield age
        if snap is not None and snap.ok and snap.destination_counts:
            per = GaugeMetricFamily(
                "stowaway_destination_instances",
                "Deliveries by destination and status (an instance routed to two has two)",
                labels=["destination", "status"],
            )
            waited = GaugeMetricFamily(
                "stowaway_destination_oldest_pending_age_seconds",
                "Age of the destination's oldest pending delivery (0 when none)",
                labels=["destination"],
            )
            for name, by_status in snap.destination_counts.items():
                for status in Status:
                    per.add_metric([name, status.value], float(by_status.get(status, 0)))
                first = snap.destination_oldest.get(name)
                age_s = max(0.0, (utcnow() - first).total_seconds()) if first else 0.0
                waited.add_metric([name], age_s)
            yield per
            yield waited
        gauge = GaugeMetricFamily(
            "stowaway_destination_blocked",
            "1 while the destination refuses us (401/403, wrong URL, association rejected) "
            "and deliveries to it wait",
            labels=["destination"],
        )
        for name in self.destinations:
            blocked = self._blocked_override.get(name)
            if blocked is None and snap is not None:
                blocked = snap.destination_blocked.get(name)
            if blocked is not None:
                gauge.add_metric([name], 1.0 if blocked else 0.0)
        if gauge.samples:
            yield gauge


#: ``reason`` label of ``stowaway_commitment_failed_instances_total``, by Failure Reason.
COMMITMENT_FAILURE_REASONS = {
    0x0110: "processing_failure",
    0x0112: "no_such_object_instance",
    0x0119: "class_instance_conflict",
}
#: ``outcome`` label of ``stowaway_commitment_requests_total`` (db.commitments.Recorded).
COMMITMENT_REQUEST_OUTCOMES = ("new", "duplicate", "reopened")


class CommitmentCollector(Collector):
    """Storage commitment gauges read from the queue database at scrape time (cached
    for ``max_age`` seconds, like the queue's)."""

    def __init__(self, engine: Engine, *, max_age: float = 2.0) -> None:
        from stowaway.db.commitments import Commitments

        self.commitments = Commitments(engine)
        self.max_age = max_age
        self._read_at = float("-inf")
        self._stats: object = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        from stowaway.db.commitments import CommitmentStats
        from stowaway.db.models import CommitmentStatus

        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age:
                try:
                    self._stats = self.commitments.stats()
                except SQLAlchemyError as exc:
                    log.warning(
                        "metrics_commitments_unavailable", extra={"error": type(exc).__name__}
                    )
                    self._stats = None
                self._read_at = time.monotonic()
            stats = self._stats
        if not isinstance(stats, CommitmentStats):
            return
        open_ = GaugeMetricFamily(
            "stowaway_commitments_open",
            "Storage commitment requests not reported yet (waiting for their instances, "
            "or for the requester to take the report)",
        )
        open_.add_metric([], float(stats.counts[CommitmentStatus.OPEN]))
        yield open_
        due = GaugeMetricFamily(
            "stowaway_commitment_reports_due",
            "Open requests whose result is decided and whose report waits for the requester",
        )
        due.add_metric([], float(stats.reports_due))
        yield due
        age = GaugeMetricFamily(
            "stowaway_commitment_oldest_open_age_seconds",
            "Age of the oldest open storage commitment request (0 when none)",
        )
        oldest = stats.oldest_open_requested_at
        age.add_metric([], max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
        yield age
        abandoned = GaugeMetricFamily(
            "stowaway_commitments_abandoned",
            "Requests whose report never reached the requester (--commitment-report-for)",
        )
        abandoned.add_metric([], float(stats.counts[CommitmentStatus.ABANDONED]))
        yield abandoned


class DiskCollector(Collector):
    """Free space on the spool's file system, read at scrape time (a statvfs call).

    ``min_free`` is the receiver's ``--min-free-disk`` (None in a forward-only
    process, which does not stop for it): exported beside the free space so
    that an alert compares the two without repeating the setting.
    """

    def __init__(self, path: Path, min_free: int | None = None) -> None:
        self.path = path
        self.min_free = min_free

    def collect(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            return
        free = GaugeMetricFamily("stowaway_spool_free_bytes", "Free bytes on the spool's disk")
        free.add_metric([], float(usage.free))
        yield free
        total = GaugeMetricFamily("stowaway_spool_size_bytes", "Size of the spool's disk")
        total.add_metric([], float(usage.total))
        yield total
        if self.min_free is not None:
            floor = GaugeMetricFamily(
                "stowaway_spool_min_free_bytes",
                "--min-free-disk: below this much free space the receiver closes its DICOM ports",
            )
            floor.add_metric([], float(self.min_free))
            yield floor


class Metrics:
    """Every metric of one stowaway process, in its own registry.

    A registry of our own (not prometheus_client's global one) keeps tests and
    several instances in one process independent; the process, platform and
    garbage-collector collectors are added to it because they cost nothing.
    """

    def __init__(self, *, process_collectors: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            self.registry.register(GC_COLLECTOR)
        r = self.registry
        self.instances_received = Counter(
            "stowaway_instances_received",
            "C-STORE requests answered, by status class (success, refused: retry later, "
            "rejected: bad data)",
            ["status"],
            registry=r,
        )
        self.received_bytes = Counter(
            "stowaway_received_bytes", "Bytes of instances stored in the spool", registry=r
        )
        self.cstore_seconds = Histogram(
            "stowaway_cstore_duration_seconds",
            "Time from a received dataset to its C-STORE response (spool, fsync, queue)",
            buckets=_CSTORE_BUCKETS,
            registry=r,
        )
        self.associations_open = Gauge(
            "stowaway_associations_open", "DICOM connections open now", registry=r
        )
        self.associations = Counter(
            "stowaway_associations",
            "Association requests by outcome (accepted, rejected)",
            ["outcome"],
            registry=r,
        )
        self.instances_forwarded = Counter(
            "stowaway_instances_forwarded",
            "Instances the destination stored (STOW-RS success), by destination",
            ["destination"],
            registry=r,
        )
        self.instances_failed = Counter(
            "stowaway_instances_failed",
            "Instances whose upload did not succeed, by destination and outcome class "
            "(conflict, transient, blocked, permanent)",
            ["destination", "outcome"],
            registry=r,
        )
        self.deliveries_failed = Counter(
            "stowaway_deliveries_failed",
            "Deliveries marked failed, which wait for an operator (requeue or purge), "
            "by destination and what ended them (permanent, conflict, transient: gave up)",
            ["destination", "outcome"],
            registry=r,
        )
        self.upload_seconds = Histogram(
            "stowaway_upload_duration_seconds",
            "STOW-RS request latency, by destination and outcome class",
            ["destination", "outcome"],
            buckets=_UPLOAD_SECONDS_BUCKETS,
            registry=r,
        )
        self.upload_bytes = Histogram(
            "stowaway_upload_size_bytes",
            "Bytes of instances per STOW-RS request, by destination",
            ["destination"],
            buckets=_UPLOAD_BYTES_BUCKETS,
            registry=r,
        )
        self.info = Gauge(
            "stowaway_info",
            "1 for each role this process runs (receiver, forwarder), with its version",
            ["role", "version"],
            registry=r,
        )
        self.outbound_events = Counter(
            "stowaway_outbound_events",
            "Instances a destination's redaction or compression could not be applied to, by "
            "destination and event (transcode_skipped: sent uncompressed; redaction_failed: "
            "not sent, failed)",
            ["destination", "event"],
            registry=r,
        )
        self.ready = Gauge("stowaway_ready", "1 while /readyz answers 200", registry=r)
        self.receiver_paused = Gauge(
            "stowaway_receiver_paused",
            "1 while the DICOM ports are closed (free disk below --min-free-disk)",
            registry=r,
        )
        self.commitment_requests = Counter(
            "stowaway_commitment_requests",
            "Storage commitment N-ACTIONs answered Success, by outcome (new, duplicate: "
            "the same request again while open, reopened: again after its report)",
            ["outcome"],
            registry=r,
        )
        self.commitment_reports = Counter(
            "stowaway_commitment_reports_sent",
            "N-EVENT-REPORTs the requester took, by Event Type (1 all committed, 2 failures)",
            ["event_type"],
            registry=r,
        )
        self.commitment_report_failures = Counter(
            "stowaway_commitment_report_failures",
            "Report attempts the requester did not take (retried with backoff)",
            registry=r,
        )
        self.commitment_failed_instances = Counter(
            "stowaway_commitment_failed_instances",
            "Instances reported in a Failed SOP Sequence, by Failure Reason",
            ["reason"],
            registry=r,
        )
        for outcome in COMMITMENT_REQUEST_OUTCOMES:
            self.commitment_requests.labels(outcome)
        for event_type in ("1", "2"):
            self.commitment_reports.labels(event_type)
        for reason in COMMITMENT_FAILURE_REASONS.values():
            self.commitment_failed_instances.labels(reason)
        self.receiver_processes = Gauge(
            "stowaway_receiver_processes",
            "Receiver processes serving now (--processes; 0 when receiving in the main process)",
            registry=r,
        )
        self.receiver_process_restarts = Counter(
            "stowaway_receiver_process_restarts",
            "Receiver processes that died and were started again",
            registry=r,
        )
        self.queue_retired = Counter(
            "stowaway_queue_retired",
            "Done rows deleted by retention (--retain-done) in this process",
            registry=r,
        )
        # Export every label value from the start, so rates work from the first scrape.
        for status in RECEIVE_STATUSES:
            self.instances_received.labels(status)
        for kind in ASSOCIATION_OUTCOMES:
            self.associations.labels(kind)
        self.queue_collector: QueueCollector | None = None

    # -- wiring ------------------------------------------------------------

    def runs(self, *, receive: bool, forward: bool) -> None:
        """``stowaway_info{role}``: which parts this process runs (what alerts join on)."""
        for role, running in zip(ROLES, (receive, forward), strict=True):
            if running:
                self.info.labels(role, __version__).set(1)

    def watch_queue(
        self, queue: Queue, destinations: Sequence[str] = (), max_age: float = 2.0
    ) -> QueueCollector:
        """Export the queue gauges, and each destination's when forwarding.

        The destinations' counters are exported at zero from the start, so that
        rates and ``increase()`` see their first increment.
        """
        for destination in destinations:
            for event in OUTBOUND_EVENTS:
                self.outbound_events.labels(destination, event)
        self.queue_collector = QueueCollector(queue, destinations, max_age=max_age)
        self.registry.register(self.queue_collector)
        for name in destinations:
            self.instances_forwarded.labels(name)
            for outcome in UPLOAD_OUTCOMES:
                if outcome != "success":
                    self.instances_failed.labels(name, outcome)
            for outcome in FAILURE_OUTCOMES:
                self.deliveries_failed.labels(name, outcome)
        return self.queue_collector

    def watch_commitments(self, engine: Engine) -> None:
        """Export the storage commitment gauges (where the receiver runs)."""
        self.registry.register(CommitmentCollector(engine))

    def watch_disk(self, path: Path, min_free: int | None = None) -> None:
        """Export the spool disk's free space (and the receiver's floor, ``min_free``)."""
        self.registry.register(DiskCollector(path, min_free))

    # -- callbacks ---------------------------------------------------------

    def on_store(self, outcome: StoreOutcome) -> None:
        """``StoreHandler(on_outcome=...)``: one call per C-STORE answered."""
        status = receive_status_class(outcome.status)
        self.instances_received.labels(status).inc()
        self.cstore_seconds.observe(outcome.seconds)
        if status == "success":
            self.received_bytes.inc(outcome.size_bytes)

    def on_retired(self, rows: int) -> None:
        """``QueueUpkeep(on_retired=...)``: a retention batch deleted ``rows`` done rows."""
        self.queue_retired.inc(rows)

    def on_association(self, kind: str) -> None:
        """``Receiver(on_association=...)``: open, close, accepted or rejected."""
        if kind == "open":
            self.associations_open.inc()
        elif kind == "close":
            self.associations_open.dec()
        elif kind in ASSOCIATION_OUTCOMES:
            self.associations.labels(kind).inc()

    def on_upload(self, report: UploadReport) -> None:
        """``build_forwarder(on_upload=...)``: one call per request and outcome class."""
        outcome = report.outcome if report.outcome in UPLOAD_OUTCOMES else "permanent"
        name = report.destination
        if outcome == "success":
            self.instances_forwarded.labels(name).inc(report.instances)
        else:
            self.instances_failed.labels(name, outcome).inc(report.instances)
        self.upload_seconds.labels(name, outcome).observe(report.seconds)
        self.upload_bytes.labels(name).observe(report.size_bytes)

    def on_failed(self, report: FailureReport) -> None:
        """``build_forwarder(on_failed=...)``: a delivery was marked failed."""
        outcome = report.outcome if report.outcome in FAILURE_OUTCOMES else "permanent"
        self.deliveries_failed.labels(report.destination, outcome).inc()

    def on_outbound(self, event: str, destination: str = DEFAULT_DESTINATION) -> None:
        """``build_forwarder(on_outbound=...)``: a transcode skipped or a redaction failed."""
        if event in OUTBOUND_EVENTS:
            self.outbound_events.labels(destination, event).inc()

    def on_destination(
        self, blocked: bool, _reason: str | None, destination: str = DEFAULT_DESTINATION
    ) -> None:
        """``build_forwarder(on_destination=...)``: a destination was blocked or unblocked."""
        if self.queue_collector is not None:
            self.queue_collector.destination_changed(blocked, destination)

    def on_commitment_request(self, outcome: Recorded) -> None:
        """``StorageCommitmentService(on_request=...)``: an N-ACTION answered Success."""
        if outcome.value in COMMITMENT_REQUEST_OUTCOMES:
            self.commitment_requests.labels(outcome.value).inc()

    def on_commitment_report(self, outcome: ReportOutcome) -> None:
        """``Reporter(on_report=...)``: one report attempt."""
        if not outcome.delivered:
            self.commitment_report_failures.inc()
            return
        self.commitment_reports.labels(str(outcome.event_type)).inc()
        for reason in outcome.failure_reasons:
            label = COMMITMENT_FAILURE_REASONS.get(reason, "processing_failure")
            self.commitment_failed_instances.labels(label).inc()
