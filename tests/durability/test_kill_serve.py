"""kill -9 of ``serve`` (receiver and forwarder in one process) under steady load.

Senders keep a steady stream of C-STOREs going while ``serve`` is killed and
restarted at seeded random moments; a kill lands in the middle of receipts
and uploads alike. At the end the last ``serve`` drains the queue and the
invariant is checked against the Healthcare API stub, and once against a real
Orthanc.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Corpus,
    Destination,
    KillDriver,
    Ledger,
    OrthancDestination,
    StubDestination,
    Target,
    backend,
    check_invariant,
    drained,
    end,
    env_int,
    join_all,
    scaled,
    scenario_seed,
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
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
    *,
    name: str,
    instances: int,
    cycles: int,
) -> None:
    seed = scenario_seed(name)
    rng = random.Random(seed)
    corpus = Corpus(f"{name}-{seed}", instances, per_study=20)
    target = Target()
    driver = KillDriver(
        lambda: stowaway("serve", "--dicomweb-url", url, *FAST_FORWARD, "--lease", "2s"),
        rng,
        on_start=lambda p: setattr(target, "port", p.port),
    )
    driver.launch()
    started = time.monotonic()
    # Paced senders: a steady load of about 6 s rather than a burst that ends
    # before the kills, however fast serve is.
    pace = max(0.01, 3 * 6 / instances)
    threads = start_senders(
        corpus, target, ledger, 3, deadline=started + 60 + cycles * 6, pace=pace, retry_delay=0.1
    )
    done = lambda: all(not t.is_alive() for t in threads)  # noqa: E731
    driver.run(cycles, up=(0.4, 1.8), down=(0.0, 0.3), until=done)
    assert join_all(threads, 120) == 0, "senders could not deliver everything"
    wait_until(lambda: drained(db_url), timeout=120, interval=0.25)
    report = check_invariant(
        name,
        ledger,
        db_url=db_url,
        spool_dir=tmp_path / "data" / "spool",
        destination=destination,
        record_property=record_property,  # type: ignore[arg-type]
        seed=seed,
        kills=driver.kills,
        seconds=round(time.monotonic() - started, 1),
    )
    assert driver.current is not None
    end(driver.current)
    assert driver.kills >= min(cycles, 3), "the senders finished before serve was killed"
    assert report.in_destination == report.acknowledged == instances


def test_kill_9_serve_under_steady_load(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    # Slow answers widen the window between "the destination has it" and "done".
    stub.script(Fault.slow(0.1, times=10**6))
    kill_serve_scenario(
        stowaway,
        stub.base_url,
        StubDestination(stub),
        ledger,
        db_url,
        tmp_path,
        record_property,
        name=f"kill-serve-{backend(db_url)}",
        instances=scaled(250),
        cycles=scaled(5),
    )


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_kill_9_serve(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    stub.script(Fault.slow(0.1, times=10**6))
    cycles = env_int("STOWAWAY_SOAK_CYCLES", 30)
    kill_serve_scenario(
        stowaway,
        stub.base_url,
        StubDestination(stub),
        ledger,
        db_url,
        tmp_path,
        record_property,
        name=f"soak-kill-serve-{backend(db_url)}",
        instances=env_int("STOWAWAY_SOAK_KILL_INSTANCES", cycles * 80),
        cycles=cycles,
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_serve_into_orthanc(
    stowaway: StowawayFactory,
    orthanc: OrthancServer,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    kill_serve_scenario(
        stowaway,
        orthanc.dicomweb_url,
        OrthancDestination(orthanc),
        ledger,
        db_url,
        tmp_path,
        record_property,
        name="kill-serve-orthanc-sqlite",
        instances=scaled(100),
        cycles=scaled(3),
    )
