"""stowaway.metrics: the callbacks move the right series; queue gauges come from a real queue."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from stowaway import __version__
from stowaway.db.engine import make_engine
from stowaway.db.models import DestinationState, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.forwarder.worker import FailureReport, UploadReport
from stowaway.metrics import Metrics, QueueCollector, receive_status_class
from stowaway.receiver.store import StoreOutcome

#: A destination name (names, never URLs or UIDs, label the destination gauges).
DEST = "clinical"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def new(n: int, size: int = 1000) -> NewInstance:
    return NewInstance(
        sop_instance_uid=f"1.2.826.0.1.3680043.99.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.826.0.1.3680043.99.0",
        series_instance_uid="1.2.826.0.1.3680043.99.0.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=f"2026/01/01/00/{n}.dcm",
        size_bytes=size,
        sha256="0" * 64,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0x0000, "success"),
        (0xB000, "success"),
        (0xA700, "refused"),
        (0xA7FF, "refused"),
        (0x0110, "refused"),
        (0xC210, "rejected"),
        (0xC211, "rejected"),
        (0x0122, "rejected"),
    ],
)
def test_receive_status_classes(code: int, expected: str) -> None:
    assert receive_status_class(code) == expected


def test_every_label_value_is_exported_from_the_start(queue: Queue) -> None:
    m = Metrics(process_collectors=False)
    m.watch_queue(queue, [DEST, "research"])
    for status in ("success", "refused", "rejected"):
        assert value(m, "stowaway_instances_received_total", status=status) == 0
    for name in (DEST, "research"):
        for outcome in ("conflict", "transient", "blocked", "permanent"):
            labels = {"destination": name, "outcome": outcome}
            assert value(m, "stowaway_instances_failed_total", **labels) == 0
        for outcome in ("conflict", "transient", "permanent"):
            labels = {"destination": name, "outcome": outcome}
            assert value(m, "stowaway_deliveries_failed_total", **labels) == 0
        assert value(m, "stowaway_instances_forwarded_total", destination=name) == 0
    assert value(m, "stowaway_associations_total", outcome="accepted") == 0
    # no *_created series
    assert b"_created" not in generate_latest(m.registry)


def test_store_outcomes_count_by_status_and_time_each_cstore() -> None:
    m = Metrics(process_collectors=False)
    m.on_store(StoreOutcome(0x0000, 0.020, 5000))
    m.on_store(StoreOutcome(0x0000, 0.030, 7000))
    m.on_store(StoreOutcome(0xA700, 0.001, 0))
    m.on_store(StoreOutcome(0xC210, 0.002, 0))
    assert value(m, "stowaway_instances_received_total", status="success") == 2
    assert value(m, "stowaway_instances_received_total", status="refused") == 1
    assert value(m, "stowaway_instances_received_total", status="rejected") == 1
    assert value(m, "stowaway_received_bytes_total") == 12000
    assert value(m, "stowaway_cstore_duration_seconds_count") == 4
    assert value(m, "stowaway_cstore_duration_seconds_sum") == pytest.approx(0.053)
    assert value(m, "stowaway_cstore_duration_seconds_bucket", le="0.025") == 3


def test_associations_open_and_by_outcome() -> None:
    m = Metrics(process_collectors=False)
    for kind in ("open", "open", "accepted", "open", "rejected", "close"):
        m.on_association(kind)
    assert value(m, "stowaway_associations_open") == 2
    assert value(m, "stowaway_associations_total", outcome="accepted") == 1
    assert value(m, "stowaway_associations_total", outcome="rejected") == 1
    m.on_association("close")
    m.on_association("close")
    assert value(m, "stowaway_associations_open") == 0


def test_uploads_count_instances_by_destination_and_outcome_with_latency_and_size() -> None:
    m = Metrics(process_collectors=False)
    m.on_upload(UploadReport("success", 10, 5 * 1024 * 1024, 0.8, DEST))
    m.on_upload(UploadReport("success", 2, 1024, 0.1, DEST))
    m.on_upload(UploadReport("conflict", 1, 2048, 0.1, DEST))
    m.on_upload(UploadReport("transient", 3, 3000, 30.0, DEST))
    m.on_upload(UploadReport("blocked", 4, 4000, 0.05, DEST))
    m.on_upload(UploadReport("permanent", 1, 100, 0.2, DEST))
    m.on_upload(UploadReport("success", 7, 700, 0.1, "research"))
    one = {"destination": DEST}
    assert value(m, "stowaway_instances_forwarded_total", **one) == 12
    assert value(m, "stowaway_instances_forwarded_total", destination="research") == 7
    for outcome, n in (("conflict", 1), ("transient", 3), ("blocked", 4), ("permanent", 1)):
        assert value(m, "stowaway_instances_failed_total", **one, outcome=outcome) == n
    assert value(m, "stowaway_upload_duration_seconds_count", **one, outcome="success") == 2
    assert value(m, "stowaway_upload_duration_seconds_sum", **one, outcome="transient") == 30.0
    bucket = value(m, "stowaway_upload_duration_seconds_bucket", **one, outcome="success", le="0.5")
    assert bucket == 1
    assert value(m, "stowaway_upload_size_bytes_count", **one) == 6
    assert value(m, "stowaway_upload_size_bytes_sum", **one) == 5 * 1024 * 1024 + 1024 + 2048 + 7100
    assert value(m, "stowaway_upload_size_bytes_count", destination="research") == 1
    # an outcome class this build does not know is counted, never dropped
    m.on_upload(UploadReport("weird", 1, 1, 0.1, DEST))
    assert value(m, "stowaway_instances_failed_total", **one, outcome="permanent") == 2


def test_deliveries_marked_failed_count_by_destination_and_outcome() -> None:
    m = Metrics(process_collectors=False)
    m.on_failed(FailureReport(DEST, "permanent"))
    m.on_failed(FailureReport(DEST, "permanent"))
    m.on_failed(FailureReport(DEST, "transient"))
    m.on_failed(FailureReport("research", "conflict"))
    m.on_failed(FailureReport("research", "weird"))
    counted = {
        (d, o): value(m, "stowaway_deliveries_failed_total", destination=d, outcome=o)
        for d in (DEST, "research")
        for o in ("permanent", "conflict", "transient")
    }
    assert counted == {
        (DEST, "permanent"): 2,
        (DEST, "conflict"): None,
        (DEST, "transient"): 1,
        ("research", "permanent"): 1,
        ("research", "conflict"): 1,
        ("research", "transient"): None,
    }


def test_info_names_the_roles_this_process_runs() -> None:
    receiver_only = Metrics(process_collectors=False)
    receiver_only.runs(receive=True, forward=False)
    serve = Metrics(process_collectors=False)
    serve.runs(receive=True, forward=True)
    for m, roles in ((receiver_only, {"receiver"}), (serve, {"receiver", "forwarder"})):
        seen = {
            sample.labels["role"]
            for family in m.registry.collect()
            for sample in family.samples
            if sample.name == "stowaway_info" and sample.value == 1
        }
        assert seen == roles
        assert value(m, "stowaway_info", role="receiver", version=__version__) == 1


def test_the_receivers_disk_floor_is_exported_beside_the_free_space(tmp_path: Path) -> None:
    receiver = Metrics(process_collectors=False)
    receiver.watch_disk(tmp_path, min_free=5 * 1024**2)
    assert value(receiver, "stowaway_spool_min_free_bytes") == 5 * 1024**2
    free = value(receiver, "stowaway_spool_free_bytes")
    assert free is not None and free > 0
    forwarder = Metrics(process_collectors=False)
    forwarder.watch_disk(tmp_path)
    assert value(forwarder, "stowaway_spool_min_free_bytes") is None
    assert value(forwarder, "stowaway_spool_free_bytes") is not None


def test_process_collectors_are_in_our_registry() -> None:
    m = Metrics()
    text = generate_latest(m.registry).decode()
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text


def test_queue_gauges_follow_the_queue(queue: Queue) -> None:
    m = Metrics(process_collectors=False)
    clock = Clock()
    m.watch_queue(queue)
    assert m.queue_collector is not None
    m.queue_collector.clock = clock
    assert value(m, "stowaway_queue_up") == 1
    assert value(m, "stowaway_queue_instances", status="pending") == 0
    assert value(m, "stowaway_queue_oldest_pending_age_seconds") == 0
    assert value(m, "stowaway_destination_blocked") is None  # not forwarding: not exported

    for n in range(1, 6):
        queue.enqueue(new(n, size=100 * n))
    [claimed] = queue.claim_batch("test-owner", 1, timedelta(minutes=5))
    queue.complete(claimed.id, "test-owner")
    [in_flight] = queue.claim_batch("test-owner", 1, timedelta(minutes=5))
    # still the cached read
    assert value(m, "stowaway_queue_instances", status="pending") == 0
    clock.now += 2.5
    assert value(m, "stowaway_queue_instances", status="pending") == 3
    assert value(m, "stowaway_queue_instances", status="in_flight") == 1
    assert value(m, "stowaway_queue_instances", status="done") == 1
    assert value(m, "stowaway_queue_instances", status="failed") == 0
    assert value(m, "stowaway_queue_bytes", status="pending") == 300 + 400 + 500
    assert value(m, "stowaway_queue_bytes", status="in_flight") == in_flight.size_bytes
    age = value(m, "stowaway_queue_oldest_pending_age_seconds")
    assert age is not None and 0 <= age < 60


def test_queue_reads_are_cached_across_a_scrape_storm(queue: Queue) -> None:
    clock = Clock()
    collector = QueueCollector(queue, max_age=2.0, clock=clock)
    for _ in range(50):
        list(collector.collect())
    assert collector.reads == 1
    clock.now += 1.9
    list(collector.collect())
    assert collector.reads == 1
    clock.now += 0.2
    list(collector.collect())
    assert collector.reads == 2


def test_destination_blocked_from_the_table_and_the_callback(queue: Queue) -> None:
    m = Metrics(process_collectors=False)
    clock = Clock()
    collector = m.watch_queue(queue, [DEST])
    collector.clock = clock
    assert value(m, "stowaway_destination_blocked", destination=DEST) == 0
    # another forwarder (or this one before a restart) recorded the destination blocked
    queue.set_destination(DEST, DestinationState.BLOCKED, "HTTP 403", utcnow())
    clock.now += 3
    assert value(m, "stowaway_destination_blocked", destination=DEST) == 1
    # our forwarder's callback shows at once, before the next read
    m.on_destination(False, None, DEST)
    assert value(m, "stowaway_destination_blocked", destination=DEST) == 0
    m.on_destination(True, "HTTP 403", DEST)
    assert value(m, "stowaway_destination_blocked", destination=DEST) == 1


def test_an_unreachable_database_sets_queue_up_to_0_and_omits_the_gauges() -> None:
    # Port 1 on loopback: connection refused at once.
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    try:
        m = Metrics(process_collectors=False)
        m.watch_queue(Queue(engine), [DEST])
        text = generate_latest(m.registry).decode()
    finally:
        engine.dispose()
    assert "stowaway_queue_up 0.0" in text
    assert "stowaway_queue_instances" not in text
    assert "stowaway_destination_blocked" not in text  # unknown, not reported as 0
    assert "stowaway_instances_received_total" in text  # the rest of the scrape still works


def test_no_uid_or_ae_title_ever_reaches_a_label(queue: Queue) -> None:
    m = Metrics()
    m.watch_queue(queue, [DEST])
    for n in range(3):
        queue.enqueue(new(n))
    m.on_store(StoreOutcome(0, 0.01, 10))
    m.on_upload(UploadReport("permanent", 1, 10, 0.1, DEST))
    m.runs(receive=True, forward=True)
    text = generate_latest(m.registry).decode()
    assert "1.2.826.0.1.3680043.99" not in text
    assert "MODALITY" not in text and "127.0.0.1" not in text
    label_names = set()
    for family in m.registry.collect():
        for sample in family.samples:
            label_names |= set(sample.labels)
    # status/outcome/le/destination/reason/event_type/event are ours; the rest come from
    # the platform collector (python_info). A destination label's values are configured
    # names: bounded; reason, event_type and event are fixed sets.
    assert label_names <= {
        "destination",
        "role",
        "event",
        "status",
        "outcome",
        "le",
        "reason",
        "event_type",
        "implementation",
        "major",
        "minor",
        "patchlevel",
        "version",
        "generation",
    }
    assert Status.PENDING.value in text


def test_a_single_destination_has_its_own_queue_gauges_too(queue: Queue) -> None:
    """Dashboards and alerts read the per-destination gauges whatever the number of
    destinations, so one destination must export them as well."""
    m = Metrics(process_collectors=False)
    m.watch_queue(queue, [DEST])
    for n in range(1, 3):
        queue.enqueue(dataclasses.replace(new(n), destinations=(DEST,)))
    labels = {"destination": DEST}
    assert value(m, "stowaway_destination_instances", **labels, status="pending") == 2
    age = value(m, "stowaway_destination_oldest_pending_age_seconds", **labels)
    assert age is not None and 0 <= age < 60
