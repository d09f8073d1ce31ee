"""kill -9 of the receiver at random moments while several associations are sending.

Senders retry whatever was not acknowledged, on a new association to the
restarted receiver. Afterwards a forwarder drains the queue into the Healthcare
API stub and the invariant is checked: nothing acknowledged is missing or
different, nothing unsent appears.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    KillDriver,
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
from tests.support.healthcare_stub import HealthcareStub
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(300),
    # pynetdicom leaks a socket for each refused connection while the receiver is down
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def kill_receiver_scenario(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    run: Scenario,
    *,
    instances: int,
    cycles: int,
    senders: int,
) -> None:
    corpus = run.corpus(instances)
    target = Target()
    driver = KillDriver(
        lambda: stowaway("receive"), run.rng, on_start=lambda p: setattr(target, "port", p.port)
    )
    driver.launch()
    started = time.monotonic()
    # Paced to about 6 s, so that the transfer outlasts several kills however
    # fast the receiver is.
    threads = start_senders(
        corpus,
        target,
        run.ledger,
        senders,
        deadline=started + 60 + cycles * 6,
        pace=max(0.01, senders * 6 / instances),
        retry_delay=0.1,
    )
    done = lambda: all(not t.is_alive() for t in threads)  # noqa: E731
    receiver = driver.run(cycles, up=(0.4, 1.8), down=(0.0, 0.4), until=done)
    assert join_all(threads, 120) == 0, "senders could not deliver everything"
    receiving = time.monotonic() - started
    end(receiver)

    forwarder = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST_FORWARD)
    wait_until(lambda: drained(run.db_url), timeout=120, interval=0.25)
    report = run.check(StubDestination(stub), kills=driver.kills, seconds=round(receiving, 1))
    end(forwarder)
    assert driver.kills >= min(cycles, 3), "the senders finished before the receiver was killed"
    assert report.acknowledged == instances
    assert report.in_destination == instances


def test_kill_9_receiver_while_several_associations_send(
    stowaway: StowawayFactory, stub: HealthcareStub, db_url: str, scenario: ScenarioFactory
) -> None:
    kill_receiver_scenario(
        stowaway,
        stub,
        scenario(f"kill-receiver-{backend(db_url)}", db_url),
        instances=scaled(300),
        cycles=scaled(8),
        senders=3,
    )


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_kill_9_receiver(
    stowaway: StowawayFactory, stub: HealthcareStub, db_url: str, scenario: ScenarioFactory
) -> None:
    kill_receiver_scenario(
        stowaway,
        stub,
        scenario(f"soak-kill-receiver-{backend(db_url)}", db_url),
        instances=env_int("STOWAWAY_SOAK_KILL_INSTANCES", 3000),
        cycles=env_int("STOWAWAY_SOAK_CYCLES", 30),
        senders=6,
    )
