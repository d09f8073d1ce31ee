"""Storage commitment metrics: reports by event type, failed instances by reason, and the
open requests read from the queue at scrape time, never a UID or AE title."""

from __future__ import annotations

from prometheus_client import generate_latest

from stowaway.db.commitments import CommitmentRequest, Commitments, Recorded, RequestedItem
from stowaway.db.queue import Queue
from stowaway.metrics import Metrics
from stowaway.receiver.commitment_reporter import ReportOutcome


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels or None)
    return None if value is None else float(value)


def test_reports_failures_and_open_requests_are_counted(queue: Queue) -> None:
    m = Metrics(process_collectors=False)
    m.watch_commitments(queue.engine)
    Commitments(queue.engine).record(
        CommitmentRequest(
            "1.9.1",
            "MODALITY",
            "IMPORTADAPTER",
            "127.0.0.1:1",
            "here",
            (RequestedItem("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.99.1"),),
        )
    )
    m.on_commitment_request(Recorded.NEW)
    m.on_commitment_report(ReportOutcome(True, 2, (0x0112, 0x0110)))
    m.on_commitment_report(ReportOutcome(False, 1))
    assert sample(m, "stowaway_commitment_requests_total", outcome="new") == 1
    assert sample(m, "stowaway_commitment_reports_sent_total", event_type="2") == 1
    assert sample(m, "stowaway_commitment_reports_sent_total", event_type="1") == 0
    assert sample(m, "stowaway_commitment_report_failures_total") == 1
    failed = "stowaway_commitment_failed_instances_total"
    assert sample(m, failed, reason="no_such_object_instance") == 1
    assert sample(m, failed, reason="processing_failure") == 1
    assert sample(m, failed, reason="class_instance_conflict") == 0
    assert sample(m, "stowaway_commitments_open") == 1
    age = sample(m, "stowaway_commitment_oldest_open_age_seconds")
    assert age is not None and 0 <= age < 60
    text = generate_latest(m.registry).decode()
    assert "MODALITY" not in text and "1.2.826.0.1.3680043.99" not in text
