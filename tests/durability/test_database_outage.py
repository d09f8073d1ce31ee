"""The Postgres queue becomes unreachable for a while, then comes back.

``serve`` reaches Postgres through a TCP relay that the test cuts (every open
connection reset, new ones refused) and restores; the machine's Postgres
cluster itself is never touched, other tests use it. While the queue is
unreachable the receiver must not acknowledge anything (it answers a failure
status, or refuses the association), the forwarder waits; both recover on
their own when the network returns, without a restart, through SQLAlchemy's
``pool_pre_ping``. The default 5-minute lease is kept on purpose: nothing may
wait for a lease to run out to be forwarded after the outage.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.engine import make_url

from stowaway.db.models import Status
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Corpus,
    Ledger,
    ScenarioFactory,
    StubDestination,
    Target,
    drained,
    end,
    join_all,
    queue_rows,
    seed_acknowledged,
    start_senders,
)
from tests.support.healthcare_stub import HealthcareStub
from tests.support.seeding import wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_unreachable_then_back(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    run = scenario("postgres-outage", db_url)
    corpus = run.corpus(10_000)
    url = make_url(db_url)
    with TcpProxy(url.port or 5432, url.host or "127.0.0.1") as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        proc = stowaway(
            "serve", "--dicomweb-url", stub.base_url, *FAST_FORWARD, "--db-url", proxied
        )
        target = Target(proc.port)
        stop = threading.Event()
        threads = start_senders(
            corpus,
            target,
            ledger,
            3,
            deadline=time.monotonic() + 150,
            pace=0.03,
            retry_delay=0.1,
            stop=stop,
        )
        wait_until(lambda: len(ledger.acked) >= 30 and stub.stored, timeout=30)

        proxy.cut()
        time.sleep(0.5)  # C-STOREs already past their commit may still be answered
        acked_at_cut = len(ledger.acked)
        stored_at_cut = len(stub.stored)
        time.sleep(4.0)
        acked_during = len(ledger.acked) - acked_at_cut
        statuses_during = dict(ledger.statuses)
        proxy.restore()

        wait_until(lambda: len(ledger.acked) >= acked_at_cut + 30, timeout=60)
        wait_until(lambda: len(stub.stored) > stored_at_cut + 10, timeout=60)
        stop.set()
        join_all(threads, 60)
        wait_until(lambda: drained(db_url), timeout=90, interval=0.25)
        report = run.check(StubDestination(stub), acked_while_unreachable=acked_during)
        assert proc.proc is not None and proc.proc.poll() is None, "serve died"
        log = proc.log()
        end(proc)
    assert acked_during == 0, "acknowledged while the queue database was unreachable"
    refused = sum(n for s, n in statuses_during.items() if s not in ("0x0000",))
    assert refused > 0 or "receiver_paused" in log, "the outage was never noticed by a sender"
    assert "enqueue_failed" in log or "receiver_paused" in log
    assert "queue_unavailable" in log  # the forwarder noticed and waited
    assert report.in_destination == report.acknowledged
    assert all(r.status == Status.DONE for r in queue_rows(db_url))


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_claim_committed_but_its_answer_lost(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    """Regression: a forwarder's claim reached Postgres and was committed, but the
    connection broke before the answer came back. The worker never learnt which
    rows it had leased; they stayed ``in_flight`` under its lease, and nobody
    uploaded them until the lease ran out (5 minutes by default).
    """
    run = scenario("claim-answer-lost", db_url, seed=0)
    corpus = Corpus(run.name, 30, per_study=10)
    spool_dir = run.spool_dir
    seed_acknowledged(db_url, spool_dir, corpus, ledger)
    url = make_url(db_url)
    with TcpProxy(url.port or 5432, url.host or "127.0.0.1") as relay:
        proxied = url.set(port=relay.port).render_as_string(hide_password=False)
        # The claim: one statement in autocommit, so its own answer is the commit's. Its
        # first CTE names it: retention's and the commitment reporter's statements lock
        # with SKIP LOCKED too, and may reach the relay first.
        relay.lose_commit_answer(b"WITH anchor AS", autocommit=True)
        proc = stowaway(
            "forward", "--dicomweb-url", stub.base_url, *FAST_FORWARD, "--db-url", proxied
        )
        assert relay.commit_answer_lost.wait(30), "no claim went through the relay"
        wait_until(lambda: drained(db_url), timeout=45, interval=0.25)
        report = run.check(StubDestination(stub))
        log = proc.log()
        end(proc)
    assert report.in_destination == corpus.count
    assert "unknown_leases_released" in log
