"""A claim takes one request's worth of rows: by count for small instances, by bytes
for large ones, so that a study of large instances goes as several requests at once
(one per worker) instead of one claim whose requests go one after the other."""

from __future__ import annotations

from typing import Any

from stowaway.batch_limits import BATCH_MAX_BYTES, BATCH_MAX_INSTANCES
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from stowaway.forwarder.worker import Forwarder, ForwarderConfig
from tests.support.seeding import spooled_instance

CT_BYTES = 525_000


def queued(queue: Queue, spool: Spool, n: int, size: int) -> None:
    for i in range(n):
        queue.enqueue(spooled_instance(spool, f"1.2.3.{size}.{i}", size_bytes=size))


def forwarder(queue: Queue, spool: Spool, **config: Any) -> Forwarder:
    unused: Any = None
    return Forwarder(ForwarderConfig("default", **config), queue, spool, unused)


def test_a_claim_of_large_instances_is_bounded_by_the_request_bytes(
    queue: Queue, spool: Spool
) -> None:
    queued(queue, spool, 40, CT_BYTES)
    limit = forwarder(queue, spool)._claim_limit()
    assert limit == BATCH_MAX_BYTES // CT_BYTES  # 15: a 40-instance study is 3 requests
    assert limit * CT_BYTES <= BATCH_MAX_BYTES < (limit + 1) * CT_BYTES


def test_a_claim_of_small_instances_is_bounded_by_the_request_count(
    queue: Queue, spool: Spool
) -> None:
    queued(queue, spool, 80, 4_900)
    assert forwarder(queue, spool)._claim_limit() == BATCH_MAX_INSTANCES
    assert forwarder(queue, spool, batch_max_instances=7)._claim_limit() == 7


def test_an_instance_larger_than_a_request_is_claimed_alone(queue: Queue, spool: Spool) -> None:
    queued(queue, spool, 2, 3 * BATCH_MAX_BYTES)
    assert forwarder(queue, spool)._claim_limit() == 1


def test_an_empty_queue_claims_by_count(queue: Queue, spool: Spool) -> None:
    assert forwarder(queue, spool)._claim_limit() == BATCH_MAX_INSTANCES
