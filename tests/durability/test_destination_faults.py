"""Destination faults while ``serve`` receives and forwards a steady stream.

The Healthcare API stub goes through a scripted sequence of misbehaviours: a
403 window (the destination is blocked, rows wait untouched), 503 bursts, 429
with Retry-After, connections reset in the middle of the request body,
answers slower than ``--read-timeout``, and uploads that are stored but whose
connection drops before the answer (the instance is sent again and the
identical duplicate is accepted). None of them may lose or fail an instance.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from stowaway.db.models import Status
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Ledger,
    ScenarioFactory,
    StubDestination,
    Target,
    drained,
    end,
    join_all,
    queue_rows,
    start_senders,
)
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(240),
    # pynetdicom leaks a socket for each refused connection (a paused receiver)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture
def db_url(sqlite_db_url: str) -> str:
    # Destination behaviour; the queue database does not matter here.
    return sqlite_db_url


def faults_in_order(rng: random.Random) -> list[tuple[str, Callable[[], Fault]]]:
    """Each fault kind once, in a seeded order; the 403 window comes first."""
    kinds: list[tuple[str, Callable[[], Fault]]] = [
        ("503 burst", lambda: Fault.http(503, times=rng.randint(2, 5), method="POST")),
        ("429 Retry-After", lambda: Fault.http(429, retry_after="1", method="POST")),
        ("reset mid-body", lambda: Fault.reset(read_bytes=rng.randint(100, 20000), times=2)),
        ("slower than --read-timeout", lambda: Fault.slow(2.5)),
        ("accepted, then dropped", lambda: Fault.accept_then_drop(times=3)),
        ("503 burst", lambda: Fault.http(503, times=rng.randint(2, 5), method="POST")),
        ("reset before the body", lambda: Fault.reset(read_bytes=0)),
    ]
    rng.shuffle(kinds)
    return kinds


def test_destination_faults_lose_nothing(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    run = scenario("destination-faults-sqlite", db_url)
    rng = run.rng
    # Senders keep a steady stream going until every fault has been met.
    corpus = run.corpus(10_000, per_study=10)
    stop = threading.Event()

    # The 403 window is open before anything is sent: every upload and probe is refused.
    stub.script(Fault.iam_denied(times=10**6))
    proc = stowaway("serve", "--dicomweb-url", stub.base_url, *FAST_FORWARD, "--read-timeout", "1s")
    target = Target(proc.port)
    started = time.monotonic()
    threads = start_senders(corpus, target, ledger, 3, deadline=started + 120, pace=0.03, stop=stop)
    wait_until(lambda: "destination_blocked" in proc.log(), timeout=30)
    time.sleep(2.0)
    blocked_rows = queue_rows(db_url)
    assert blocked_rows, "nothing received during the 403 window"
    assert all(r.attempts == 0 and r.status != Status.FAILED for r in blocked_rows)
    assert not stub.stored
    stub.fault = None  # the operator fixes IAM
    wait_until(lambda: "destination_unblocked" in proc.log(), timeout=30)

    applied: list[str] = []
    for label, make in faults_in_order(rng):
        before = len(stub.requests)
        stub.script(make())
        wait_until(lambda: stub.pending_faults() == 0, timeout=30, interval=0.05)
        applied.append(f"{label}@{before}")
        time.sleep(rng.uniform(0.1, 0.6))
    stop.set()
    join_all(threads, 60)
    wait_until(lambda: drained(db_url), timeout=90, interval=0.25)
    uploads = Counter(u for r in stub.requests if r.method == "POST" for u in r.sop_instance_uids)
    report = run.check(
        StubDestination(stub),
        faults=len(applied),
        uploaded_twice_or_more=sum(1 for n in uploads.values() if n > 1),
    )
    print("faults applied:", ", ".join(applied))
    assert report.in_destination == report.acknowledged > 0
    assert report.waiting_failed == 0
    rows = queue_rows(db_url)
    assert all(r.status == Status.DONE for r in rows)
    assert any(r.attempts > 0 for r in rows), "no transient fault reached an instance"
    assert any(n > 1 for n in uploads.values()), "no instance was uploaded twice"
    assert proc.log().count("destination_blocked") == 1
    end(proc)
