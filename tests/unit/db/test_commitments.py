"""Storage commitment requests in the queue: recorded once, claimed by one process at a
time, and settled by the one rule against the deliveries that count."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from stowaway.db.commitments import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    CommitmentRequest,
    Commitments,
    Delivery,
    LeaseLost,
    Recorded,
    RequestedItem,
    Settlement,
    settle_item,
)
from stowaway.db.models import CommitmentStatus, ItemResult, Status
from stowaway.db.queue import NewInstance, Queue

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
LEASE = timedelta(minutes=1)


def request(transaction: str = "1.9.1", *uids: str, aet: str = "MODALITY") -> CommitmentRequest:
    return CommitmentRequest(
        transaction_uid=transaction,
        calling_aet=aet,
        called_aet="IMPORTADAPTER",
        peer_address="127.0.0.1:5000",
        received_by="here",
        items=tuple(RequestedItem(CT, uid) for uid in (uids or ("1.2.3.1",))),
    )


def received(sop: str, *destinations: str, n: int = 1, sop_class: str = CT) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=f"2026/01/01/00/{sop}-{n}.dcm",
        size_bytes=1000,
        sha256="0" * 64,
        destinations=destinations or ("default",),
    )


def deliver(queue: Queue, destination: str, *, fail: str | None = None) -> None:
    """Claim every due row of ``destination`` and complete (or fail) it."""
    for row in queue.claim_batch("worker", 100, LEASE, destination=destination):
        if fail is None:
            queue.complete(row.id, "worker")
        else:
            queue.fail(row.id, "worker", fail)


@pytest.fixture
def commitments(queue: Queue) -> Commitments:
    return Commitments(queue.engine)


# -- the rule, on its own ------------------------------------------------------------


def done(destination: str = "default", sop_class: str = CT) -> Delivery:
    return Delivery(destination, Status.DONE, sop_class, None)


def test_an_instance_done_everywhere_is_committed_and_one_still_pending_waits() -> None:
    assert settle_item(CT, [done("a"), done("b")], expired=False).result == ItemResult.COMMITTED
    pending = Delivery("b", Status.PENDING, CT, None)
    waiting = settle_item(CT, [done("a"), pending], expired=False)
    assert waiting.result is None
    assert waiting.detail == "waiting for b"


def test_never_received_is_no_such_object_instance() -> None:
    assert settle_item(CT, [], expired=False) == Settlement(
        ItemResult.FAILED, NO_SUCH_OBJECT_INSTANCE, "never received by stowaway"
    )


def test_a_permanent_failure_or_the_timeout_is_a_processing_failure() -> None:
    failed = Delivery("b", Status.FAILED, CT, "HTTP 400: bad")
    outcome = settle_item(CT, [done("a"), failed], expired=False)
    assert (outcome.result, outcome.failure_reason) == (ItemResult.FAILED, PROCESSING_FAILURE)
    assert "b failed: HTTP 400: bad" in (outcome.detail or "")
    late = settle_item(CT, [Delivery("a", Status.IN_FLIGHT, CT, None)], expired=True)
    assert (late.result, late.failure_reason) == (ItemResult.FAILED, PROCESSING_FAILURE)
    unrouted = settle_item(CT, [Delivery("", Status.UNROUTED, CT, None)], expired=False)
    assert unrouted.result is None


def test_another_sop_class_than_stored_is_a_class_instance_conflict() -> None:
    outcome = settle_item(MR, [done()], expired=False)
    assert (outcome.result, outcome.failure_reason) == (ItemResult.FAILED, CLASS_INSTANCE_CONFLICT)


def test_an_instance_a_verification_did_not_find_waits_then_fails() -> None:
    assert settle_item(CT, [done("a")], expired=False, not_found_at=["a"]).result is None
    late = settle_item(CT, [done("a")], expired=True, not_found_at=["a"])
    assert late.failure_reason == PROCESSING_FAILURE


# -- the queue operations -------------------------------------------------------------


def test_a_request_is_recorded_once_and_the_same_one_again_is_a_duplicate(
    commitments: Commitments,
) -> None:
    first = commitments.record(request("1.9.1", "1.2.3.1", "1.2.3.2"))
    again = commitments.record(request("1.9.1", "1.2.3.1", "1.2.3.2"))
    assert first.outcome == Recorded.NEW
    assert again == replace(first, outcome=Recorded.DUPLICATE)
    assert [i.sop_instance_uid for i in commitments.items(first.id)] == ["1.2.3.1", "1.2.3.2"]
    assert len(commitments.rows()) == 1
    # other items under the same Transaction UID: refused, the recorded one untouched
    assert commitments.record(request("1.9.1", "1.2.3.9")).outcome == Recorded.CONFLICT
    # another requester may use the same Transaction UID
    assert commitments.record(request("1.9.1", aet="OTHER")).outcome == Recorded.NEW


def test_a_reported_request_asked_again_is_reopened_for_a_new_report(
    commitments: Commitments,
) -> None:
    first = commitments.record(request())
    assert len(commitments.claim_due("me", LEASE, 10)) == 1
    commitments.settle(first.id, "me", [Settlement(ItemResult.COMMITTED)])
    commitments.reported(first.id, "me")
    assert commitments.get(first.id).status == CommitmentStatus.REPORTED  # type: ignore[union-attr]
    again = commitments.record(request())
    assert again.outcome == Recorded.REOPENED
    record = commitments.get(first.id)
    assert record is not None
    assert (record.status, record.settled_at, record.event_type) == (
        CommitmentStatus.OPEN,
        None,
        None,
    )
    assert [i.result for i in commitments.items(first.id)] == [None]


def test_concurrent_receipts_of_one_request_record_it_once(commitments: Commitments) -> None:
    outcomes: list[Recorded] = []
    lock = threading.Lock()

    def record() -> None:
        result = commitments.record(request("1.9.7", "1.2.3.1"))
        with lock:
            outcomes.append(result.outcome)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted([Recorded.NEW] + [Recorded.DUPLICATE] * 3)
    assert len(commitments.rows()) == 1


def test_a_claimed_request_is_held_by_one_process_until_its_lease_expires(
    commitments: Commitments,
) -> None:
    recorded = commitments.record(request())
    assert [c.id for c in commitments.claim_due("a", LEASE, 10)] == [recorded.id]
    assert commitments.claim_due("b", LEASE, 10) == []
    with pytest.raises(LeaseLost):
        commitments.wait(recorded.id, "b", recorded_at_now(commitments, recorded.id))
    # a dead holder's lease expires: another process takes it, and the first one's
    # writes no longer land
    commitments.claim_due("a", LEASE, 10)
    expire(commitments, recorded.id)
    assert [c.id for c in commitments.claim_due("b", LEASE, 10)] == [recorded.id]
    with pytest.raises(LeaseLost):
        commitments.reported(recorded.id, "a")
    commitments.reported(recorded.id, "b")
    assert commitments.claim_due("c", LEASE, 10) == []


def test_concurrent_reporters_claim_each_request_exactly_once(commitments: Commitments) -> None:
    ids = {commitments.record(request(f"1.9.{n}")).id for n in range(30)}
    seen: list[int] = []
    lock = threading.Lock()

    def claim(owner: str) -> None:
        while True:
            got = commitments.claim_due(owner, LEASE, 3)
            if not got:
                return
            with lock:
                seen.extend(c.id for c in got)

    threads = [threading.Thread(target=claim, args=(f"r{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(ids)


def test_deliveries_count_every_destination_and_leave_superseded_copies_out(
    queue: Queue, commitments: Commitments
) -> None:
    queue.enqueue(received("1.2.3.1", "a", "b"))
    deliver(queue, "a")
    found = commitments.deliveries(["1.2.3.1", "1.2.3.9"])
    assert sorted((d.destination, d.status) for d in found["1.2.3.1"]) == [
        ("a", Status.DONE),
        ("b", Status.PENDING),
    ]
    assert found["1.2.3.9"] == []
    deliver(queue, "b", fail="HTTP 400: refused")
    outcome = settle_item(CT, commitments.deliveries(["1.2.3.1"])["1.2.3.1"], expired=False)
    assert outcome.failure_reason == PROCESSING_FAILURE
    # sent again: the new copy supersedes the delivered one at a and the failed one at b
    queue.enqueue(received("1.2.3.1", "a", "b", n=2))
    now = commitments.deliveries(["1.2.3.1"])["1.2.3.1"]
    assert sorted((d.destination, d.status) for d in now) == [
        ("a", Status.PENDING),
        ("b", Status.PENDING),
    ]
    deliver(queue, "a")
    deliver(queue, "b")
    final = commitments.deliveries(["1.2.3.1"])["1.2.3.1"]
    # a failed copy older than a delivered one no longer counts
    assert sorted((d.destination, d.status) for d in final) == [
        ("a", Status.DONE),
        ("b", Status.DONE),
    ]
    assert settle_item(CT, final, expired=False).result == ItemResult.COMMITTED


def test_a_copy_closed_as_superseded_does_not_count_as_delivered(
    queue: Queue, commitments: Commitments
) -> None:
    first = queue.enqueue(received("1.2.3.1", "a"))
    [held] = queue.claim_batch("worker", 10, LEASE, destination="a")
    assert held.id == first.id
    queue.enqueue(received("1.2.3.1", "a", n=2))  # a newer copy while the first is in flight
    assert queue.supersede_if_newer(first.id, "worker") is not None  # closed, not uploaded
    found = commitments.deliveries(["1.2.3.1"])["1.2.3.1"]
    assert [(d.destination, d.status) for d in found] == [("a", Status.PENDING)]


def recorded_at_now(commitments: Commitments, commitment_id: int):  # type: ignore[no-untyped-def]
    record = commitments.get(commitment_id)
    assert record is not None
    return record.next_attempt_at


def expire(commitments: Commitments, commitment_id: int) -> None:
    from sqlalchemy import update

    from stowaway.db.models import Commitment, utcnow

    with commitments.engine.begin() as conn:
        conn.execute(
            update(Commitment)
            .where(Commitment.id == commitment_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_a_due_request_is_left_to_the_process_that_took_it_for_the_handover(
    commitments: Commitments,
) -> None:
    recorded = commitments.record(request())  # received_by="here"
    handover = timedelta(hours=1)
    assert commitments.claim_due("elsewhere", LEASE, 10, handover=handover) == []
    [mine] = commitments.claim_due("here", LEASE, 10, handover=handover)
    assert mine.id == recorded.id
    commitments.release(recorded.id, "here")
    # due for longer than the handover (its process is gone, or busy): anyone's
    assert commitments.claim_due("elsewhere", LEASE, 10, handover=timedelta(0)) != []
