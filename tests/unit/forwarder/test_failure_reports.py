"""The forwarder reports each delivery it marks ``failed``, with its destination and why,
and only those: a retry or a blocked destination is not a failure an operator must act on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from stowaway.db.models import Status
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from stowaway.forwarder.retry import RetryPolicy
from stowaway.forwarder.stow import StowClient
from stowaway.forwarder.worker import FailureReport, Forwarder, ForwarderConfig, UploadReport
from tests.support.dicom_files import make_ct
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.unit.forwarder.test_overwrite import spooled

LEASE = timedelta(minutes=5)
DEST = "clinical"


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def forward_one(
    queue: Queue, spool: Spool, stub: HealthcareStub, source: Path, max_attempts: int | None
) -> tuple[int, list[FailureReport], list[UploadReport]]:
    row_id = queue.enqueue(spooled(spool, source)).id
    failures: list[FailureReport] = []
    uploads: list[UploadReport] = []
    config = ForwarderConfig(DEST, stub.base_url, retry=RetryPolicy(0.01, 0.01, max_attempts))
    forwarder = Forwarder(
        config,
        queue,
        spool,
        lambda: StowClient(stub.base_url),
        on_upload=uploads.append,
        on_failed=failures.append,
    )
    [row] = queue.claim_batch("w", 1, LEASE)
    with StowClient(stub.base_url, connect_timeout=2, read_timeout=2) as client:
        forwarder._forward("w", client, [row])
    return row_id, failures, uploads


def status_of(queue: Queue, row_id: int) -> Status:
    row = queue.get(row_id)
    assert row is not None
    return row.status


def test_a_permanent_refusal_is_reported_as_a_failed_delivery_of_its_destination(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    stub.script(Fault.http(400, body="bad instance"))
    row_id, failures, uploads = forward_one(
        queue, spool, stub, make_ct(tmp_path / "a.dcm", seed=1), None
    )
    assert status_of(queue, row_id) == Status.FAILED
    assert failures == [FailureReport(DEST, "permanent")]
    assert [(u.destination, u.outcome, u.instances) for u in uploads] == [(DEST, "permanent", 1)]


def test_a_retry_is_not_a_failure(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    stub.script(Fault.http(503))
    row_id, failures, _ = forward_one(queue, spool, stub, make_ct(tmp_path / "a.dcm", seed=2), None)
    assert status_of(queue, row_id) == Status.PENDING
    assert failures == []


def test_giving_up_after_max_attempts_is_a_transient_failure(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    stub.script(Fault.http(503))
    row_id, failures, _ = forward_one(queue, spool, stub, make_ct(tmp_path / "b.dcm", seed=3), 1)
    assert status_of(queue, row_id) == Status.FAILED
    assert failures == [FailureReport(DEST, "transient")]


def test_a_blocked_destination_reports_no_failed_delivery(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    stub.script(Fault.iam_denied())
    row_id, failures, uploads = forward_one(
        queue, spool, stub, make_ct(tmp_path / "a.dcm", seed=4), None
    )
    assert status_of(queue, row_id) == Status.PENDING
    assert failures == []
    assert [(u.destination, u.outcome) for u in uploads] == [(DEST, "blocked")]


def test_a_damaged_spool_file_is_reported_as_a_permanent_failure(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    source = make_ct(tmp_path / "a.dcm", seed=5)
    row_id = queue.enqueue(spooled(spool, source)).id
    row = queue.get(row_id)
    assert row is not None
    spool.absolute(row.spool_path).write_bytes(b"truncated")
    failures: list[FailureReport] = []
    forwarder = Forwarder(
        ForwarderConfig(DEST, stub.base_url),
        queue,
        spool,
        lambda: StowClient(stub.base_url),
        on_failed=failures.append,
    )
    [claimed] = queue.claim_batch("w", 1, LEASE)
    with StowClient(stub.base_url, connect_timeout=2, read_timeout=2) as client:
        forwarder._forward("w", client, [claimed])
    assert status_of(queue, row_id) == Status.FAILED
    assert failures == [FailureReport(DEST, "permanent")]
    assert stub.requests == []
