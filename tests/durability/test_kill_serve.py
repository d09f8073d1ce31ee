"""kill -9 of ``serve`` (receiver and forwarder in one process) under steady load.

Senders keep a steady stream of C-STOREs going while ``serve`` is killed and
restarted at seeded random moments; a kill lands in the middle of receipts
and uploads alike. At the end the last ``serve`` drains the queue and the
invariant is checked against the Healthcare API stub, and once against a real
Orthanc.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Destination,
    KillDriver,
    OrthancDestination,
    Scenario,
    ScenarioFactory,
    StubDestination,
    Target,
    backend,
    drained,
    end,
    env_int,
    join_all,
    scaled,
    start_senders,
)
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.orthanc import OrthancServer
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(300),
    # pynetdicom leaks a socket for each refused connection while serve is down
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def kill_serve_scenario(
    stowaway: StowawayFactory,
    url: str,
    destination: Destination,
    run: Scenario,
    *,
    instances: int,
    cycles: int,
) -> None:
    corpus = run.corpus(instances, per_study=20)
    target = Target()
    driver = KillDriver(
        lambda: stowaway("serve", "--dicomweb-url", url, *FAST_FORWARD, "--lease", "2s"),
        run.rng,
        on_start=lambda p: setattr(target, "port", p.port),
    )
    driver.launch()
    started = time.monotonic()
    # Paced senders: a steady load of about 6 s rather than a burst that ends
    # before the kills, however fast serve is.
    pace = max(0.01, 3 * 6 / instances)
    threads = start_senders(
        corpus,
        target,
        run.ledger,
        3,
        deadline=started + 60 + cycles * 6,
        pace=pace,
        retry_delay=0.1,
    )
    done = lambda: all(not t.is_alive() for t in threads)  # noqa: E731
    driver.run(cycles, up=(0.4, 1.8), down=(0.0, 0.3), until=done)
    assert join_all(threads, 120) == 0, "senders could not deliver everything"
    wait_until(lambda: drained(run.db_url), timeout=120, interval=0.25)
    report = run.check(
        destination, kills=driver.kills, seconds=round(time.monotonic() - started, 1)
    )
    assert driver.current is not None
    end(driver.current)
    assert driver.kills >= min(cycles, 3), "the senders finished before serve was killed"
    assert report.in_destination == report.acknowledged == instances


def test_kill_9_serve_under_steady_load(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    # Slow answers widen the window between "the destination has it" and "done".
    stub.script(Fault.slow(0.1, times=10**6))
    kill_serve_scenario(
        stowaway,
        stub.base_url,
        StubDestination(stub),
        scenario(f"kill-serve-{backend(db_url)}", db_url),
        instances=scaled(250),
        cycles=scaled(5),
    )


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_kill_9_serve(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    stub.script(Fault.slow(0.1, times=10**6))
    cycles = env_int("STOWAWAY_SOAK_CYCLES", 30)
    kill_serve_scenario(
        stowaway,
        stub.base_url,
        StubDestination(stub),
        scenario(f"soak-kill-serve-{backend(db_url)}", db_url),
        instances=env_int("STOWAWAY_SOAK_KILL_INSTANCES", cycles * 80),
        cycles=cycles,
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_serve_into_orthanc(
    stowaway: StowawayFactory,
    orthanc: OrthancServer,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    kill_serve_scenario(
        stowaway,
        orthanc.dicomweb_url,
        OrthancDestination(orthanc),
        scenario("kill-serve-orthanc-sqlite", db_url),
        instances=scaled(100),
        cycles=scaled(3),
    )
