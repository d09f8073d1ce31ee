"""Two and three forwarders sharing one Postgres queue, each killed -9 independently.

Each forwarder process is started, killed at a seeded random moment and
restarted by its own driver thread; the Healthcare API stub stores every upload
and waits before answering, so kills land between the destination's answer and
the commit. Rows of a killed forwarder are taken over once their lease
(``--lease 2s``) runs out; ``FOR UPDATE SKIP LOCKED`` keeps live leases apart.
"""

from __future__ import annotations

import random
import threading

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    KillDriver,
    ScenarioFactory,
    StubDestination,
    drained,
    end,
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


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("forwarders", [2, 3])
def test_several_forwarders_on_postgres_killed_independently(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    scenario: ScenarioFactory,
    forwarders: int,
) -> None:
    run = scenario(f"kill-{forwarders}-forwarders-postgres", db_url)
    instances = scaled(150)
    corpus = run.corpus(instances, per_study=25)
    seed_acknowledged(db_url, run.spool_dir, corpus, run.ledger)
    stub.script(Fault.slow(0.25, times=10**6))
    drivers = [
        KillDriver(
            lambda: stowaway(
                "forward",
                "--dicomweb-url",
                stub.base_url,
                *FAST_FORWARD,
                *LEASE,
            ),
            random.Random(run.seed + k),
            ready=started_forwarding,
        )
        for k in range(forwarders)
    ]
    finals: list[StowawayProcess] = []
    errors: list[BaseException] = []

    def chaos(driver: KillDriver) -> None:
        try:
            finals.append(
                driver.run(
                    scaled(2),
                    up=(0.3, 2.0),
                    down=(0.0, 0.5),
                    until=lambda: drained(db_url),
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chaos, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    wait_until(lambda: drained(db_url), timeout=120, interval=0.25)
    for proc in finals:
        end(proc)
    uploads = uploads_per_uid(stub)
    report = run.check(
        StubDestination(stub),
        kills=sum(d.kills for d in drivers),
        uploaded_twice_or_more=sum(1 for n in uploads.values() if n > 1),
    )
    assert report.in_destination == instances
    assert sum(d.kills for d in drivers) >= forwarders
