"""kill -9 of forwarders in the middle of uploads.

The queue is filled as the receiver fills it (spooled, fsynced, committed),
and those instances count as acknowledged. The Healthcare API stub stores each
upload and then waits before answering, so most kills land after the
destination has the instance and before the forwarder has recorded it: the
row's lease runs out (``--lease 2s``), another forwarder takes it and uploads
it again, and the destination accepts the identical duplicate.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.models import Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Corpus,
    KillDriver,
    Ledger,
    Scenario,
    ScenarioFactory,
    StubDestination,
    backend,
    drained,
    end,
    env_int,
    queue_rows,
    scaled,
    seed_acknowledged,
    uploads_per_uid,
    wait_for_log,
)
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.processes import StowawayProcess
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(300)

LEASE = ("--lease", "2s", "--batch-max-instances", "5")


def started_forwarding(proc: StowawayProcess) -> None:
    wait_for_log(proc, "forwarder_started")


def kill_forwarder_scenario(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    run: Scenario,
    *,
    instances: int,
    cycles: int,
) -> None:
    db_url = run.db_url
    corpus = run.corpus(instances, per_study=25)
    seed_acknowledged(db_url, run.spool_dir, corpus, run.ledger)
    stub.script(Fault.slow(0.25, times=10**6))

    started = time.monotonic()
    driver = KillDriver(
        lambda: stowaway("forward", "--dicomweb-url", stub.base_url, *FAST_FORWARD, *LEASE),
        run.rng,
        ready=started_forwarding,
    )
    driver.run(cycles, up=(0.3, 1.5), down=(0.0, 0.3), until=lambda: drained(db_url))
    wait_until(lambda: drained(db_url), timeout=120, interval=0.25)
    uploads = uploads_per_uid(stub)
    report = run.check(
        StubDestination(stub),
        kills=driver.kills,
        seconds=round(time.monotonic() - started, 1),
        uploaded_twice_or_more=sum(1 for n in uploads.values() if n > 1),
    )
    assert driver.current is not None
    end(driver.current)
    assert driver.kills >= min(cycles, 3)
    assert report.in_destination == instances
    assert any(n > 1 for n in uploads.values()), "no kill landed between upload and record"


def test_kill_9_forwarder_during_uploads(
    stowaway: StowawayFactory, stub: HealthcareStub, db_url: str, scenario: ScenarioFactory
) -> None:
    kill_forwarder_scenario(
        stowaway,
        stub,
        scenario(f"kill-forwarder-{backend(db_url)}", db_url),
        instances=scaled(200),
        cycles=scaled(6),
    )


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_kill_9_forwarder(
    stowaway: StowawayFactory, stub: HealthcareStub, db_url: str, scenario: ScenarioFactory
) -> None:
    cycles = env_int("STOWAWAY_SOAK_CYCLES", 30)
    kill_forwarder_scenario(
        stowaway,
        stub,
        scenario(f"soak-kill-forwarder-{backend(db_url)}", db_url),
        instances=env_int("STOWAWAY_SOAK_KILL_INSTANCES", cycles * 100),
        cycles=cycles,
    )


def test_copy_sent_again_while_its_forwarder_was_dead(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    """Regression: ``serve`` killed while uploading instances it had just received,
    before their senders got the answer. The senders send them again: new
    pending rows next to the dead forwarder's in-flight ones. Once the lease ran
    out, both copies were claimed into one STOW-RS request, which the client
    refuses (duplicate UIDs), and the forwarder claimed and refused them for ever.
    """
    run = scenario(f"resent-after-forwarder-died-{backend(db_url)}", db_url, seed=0)
    corpus = Corpus(run.name, 6, per_study=6)
    spool_dir = run.spool_dir
    seed_acknowledged(db_url, spool_dir, corpus, ledger)
    engine = make_engine(db_url)
    try:
        dead = Queue(engine).claim_batch("dead-forwarder", 10, timedelta(seconds=1))
    finally:
        engine.dispose()
    assert len(dead) == corpus.count
    seed_acknowledged(db_url, spool_dir, corpus, ledger)  # the same instances, sent again
    time.sleep(1.2)  # the dead forwarder's lease runs out
    # One claim takes both copies of every instance.
    batch = ("--lease", "2s", "--batch-max-instances", "20")
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST_FORWARD, *batch)
    wait_until(lambda: drained(db_url), timeout=30, interval=0.2)
    end(proc)
    report = run.check(StubDestination(stub))
    assert report.in_destination == corpus.count
    rows = queue_rows(db_url)
    assert [r.status for r in rows] == [Status.DONE] * 2 * corpus.count
    superseded = {r.id for r in rows if (r.last_error or "").startswith("superseded")}
    assert superseded == {r.id for r in dead}  # the old copies are never sent again
    assert set(uploads_per_uid(stub).values()) == {1}
