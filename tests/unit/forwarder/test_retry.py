"""The backoff stays finite however many attempts a row or a probe has behind it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.forwarder.outcome import InstanceOutcome, OutcomeKind
from stowaway.forwarder.retry import RetryPolicy
from stowaway.forwarder.worker import Forwarder, ForwarderConfig

POLICY = RetryPolicy(initial=2.0, maximum=600.0)
DESTINATION = "http://127.0.0.1:1/dicomWeb"


@pytest.mark.parametrize("attempts", [1024, 1025, 10_000])
def test_the_delay_after_very_many_attempts_is_the_maximum(attempts: int) -> None:
    delay = POLICY.delay(attempts)
    assert POLICY.maximum / 2 <= delay <= POLICY.maximum
    when = POLICY.next_attempt(utcnow(), attempts)
    assert when is not None and when <= utcnow() + timedelta(seconds=POLICY.maximum)


def test_the_delay_still_doubles_from_the_first_attempt() -> None:
    exact = RetryPolicy(initial=2.0, maximum=1e9)
    for attempts, full in ((1, 2.0), (2, 4.0), (10, 1024.0)):
        assert full / 2 <= exact.delay(attempts) <= full


def forwarder(queue: Queue) -> Forwarder:
    unused: Any = None
    config = ForwarderConfig(DESTINATION, retry=POLICY)
    return Forwarder(config, queue, unused, unused)


def test_a_transient_failure_at_attempt_10000_is_scheduled_not_raised(queue: Queue) -> None:
    row_id = queue.enqueue(
        NewInstance(
            sop_instance_uid="1.2.3.4",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="MODALITY",
            peer_address="127.0.0.1:5000",
            spool_path="a.dcm",
            size_bytes=1,
            sha256="0" * 64,
        )
    ).id
    with queue.engine.begin() as conn:
        conn.execute(update(Instance).where(Instance.id == row_id).values(attempts=9_999))
    [row] = queue.claim_batch("w", 1, timedelta(minutes=5))
    forwarder(queue)._settle("w", row, InstanceOutcome(OutcomeKind.TRANSIENT, "HTTP 503", 503))
    after = queue.get(row_id)
    assert after is not None
    assert after.status == Status.PENDING and after.attempts == 10_000
    assert after.next_attempt_at <= utcnow() + timedelta(seconds=POLICY.maximum)


def test_the_probe_backoff_after_10000_blocked_probes_is_the_maximum(queue: Queue) -> None:
    f = forwarder(queue)
    f._blocked_since_probe = 9_999
    f._destination_blocked("HTTP 403")
    state = queue.destination(DESTINATION)
    assert state is not None and state.next_probe_at is not None
    assert state.next_probe_at <= utcnow() + timedelta(seconds=POLICY.maximum)
