"""The soak: a stream of instances through ``serve`` while faults are injected at random.

A seeded chaos loop picks, every half second to two seconds, one of: a 503
burst, a 429 with Retry-After, a reset in the middle of the request body, an
answer slower than ``--read-timeout``, an upload stored but never answered, a
short 403 window, or kill -9 of ``serve`` and a restart. Senders retry what
was not acknowledged. At the end the destination is healthy again, the queue
drains, and the invariant is checked.

CI runs 1,000 instances on SQLite; ``--soak`` runs STOWAWAY_SOAK_INSTANCES (default
20,000) with STOWAWAY_SOAK_SEED.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    BASE_SEED,
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
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.seeding import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def chaos_actions(stub: HealthcareStub, rng: random.Random) -> dict[str, Callable[[], object]]:
    return {
        "503": lambda: stub.script(Fault.http(503, times=rng.randint(1, 6), method="POST")),
        "429": lambda: stub.script(Fault.http(429, retry_after="1", method="POST")),
        "reset": lambda: stub.script(Fault.reset(read_bytes=rng.randint(0, 50000))),
        "slow": lambda: stub.script(Fault.slow(1.5)),
        "drop": lambda: stub.script(Fault.accept_then_drop(times=rng.randint(1, 3))),
        "403": lambda: stub.script(Fault.iam_denied(times=rng.randint(2, 4))),
    }


def soak_scenario(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    run: Scenario,
    *,
    instances: int,
    senders: int,
    max_kills: int,
    budget: float,
) -> None:
    rng = run.rng
    db_url = run.db_url
    corpus = run.corpus(instances, per_study=50)
    target = Target()
    driver = KillDriver(
        lambda: stowaway(
            "serve",
            "--dicomweb-url",
            stub.base_url,
            *FAST_FORWARD,
            "--lease",
            "2s",
            "--read-timeout",
            "1s",
            "--batch-max-instances",
            "20",
        ),
        rng,
        on_start=lambda p: setattr(target, "port", p.port),
    )
    driver.launch()
    started = time.monotonic()
    threads = start_senders(
        corpus, target, run.ledger, senders, deadline=started + budget, retry_delay=0.1
    )
    actions = chaos_actions(stub, rng)
    injected: Counter[str] = Counter()

    def sending() -> bool:
        return any(t.is_alive() for t in threads)

    step = 0
    while sending():
        time.sleep(rng.uniform(0.5, 2.0))
        if not sending():
            break
        step += 1
        first_kill_due = step == 3 and driver.kills == 0
        if driver.kills < max_kills and (rng.random() < 0.15 or first_kill_due):
            driver.restart()
            injected["kill -9"] += 1
        else:
            kind = rng.choice(sorted(actions))
            actions[kind]()
            injected[kind] += 1
    unacked = join_all(threads, 60)
    sending_s = time.monotonic() - started
    stub.fault = None  # the destination is healthy again
    assert driver.current is not None
    wait_until(lambda: drained(db_url), timeout=max(120, instances / 50), interval=0.5)
    report = run.check(
        StubDestination(stub),
        injected=dict(sorted(injected.items())),
        sending_s=round(sending_s, 1),
        total_s=round(time.monotonic() - started, 1),
    )
    assert unacked == 0, f"{unacked} instances never acknowledged within {budget} s"
    assert report.in_destination == report.acknowledged == instances
    assert report.waiting_failed == 0
    end(driver.current)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ci_soak_1000_instances_with_random_faults(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    soak_scenario(
        stowaway,
        stub,
        scenario(f"ci-soak-{backend(db_url)}", db_url),
        instances=scaled(1000),
        senders=6,
        max_kills=3,
        budget=150,
    )


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_20000_instances_with_random_faults(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    instances = env_int("STOWAWAY_SOAK_INSTANCES", 20000)
    seed = int(os.environ.get("STOWAWAY_SOAK_SEED", str(BASE_SEED)))
    soak_scenario(
        stowaway,
        stub,
        scenario(f"soak-{backend(db_url)}", db_url, seed=seed),
        instances=instances,
        senders=8,
        max_kills=max(3, instances // 1000),
        budget=max(300.0, instances / 20),
    )
