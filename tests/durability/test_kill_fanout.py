"""kill -9 of ``serve`` while it fans every instance out to two destinations.

Each instance has a delivery per destination, recorded in the transaction that commits
its row, and its spool file stays until both are done. Killed at seeded random moments
mid-receipt and mid-upload, the last ``serve`` must still get every acknowledged
instance to *both* destinations: the Healthcare API stub and a real Orthanc.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Corpus,
    KillDriver,
    Ledger,
    OrthancDestination,
    StubDestination,
    Target,
    check_invariant,
    drained,
    end,
    join_all,
    queue_rows,
    scaled,
    scenario_seed,
    start_senders,
)
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.orthanc import OrthancServer
from tests.support.processes import run_cli
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def fan_out_to(tmp_path: Path, stub_url: str, orthanc_url: str) -> Path:
    path = tmp_path / "destinations.yaml"
    path.write_text(
        "destinations:\n"
        f"  - {{name: cloud, kind: dicomweb, url: '{stub_url}', auth: none}}\n"
        f"  - {{name: local, kind: dicomweb, url: '{orthanc_url}', auth: none}}\n"
        "matching: all\n"
        "rules:\n"
        "  - {name: everything, to: [cloud, local]}\n"
    )
    return path


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_serve_during_fan_out_loses_nothing_at_either_destination(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    orthanc: OrthancServer,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    name = "kill-serve-fan-out-sqlite"
    seed = scenario_seed(name)
    rng = random.Random(seed)
    instances, cycles = scaled(120), scaled(4)
    stub.script(Fault.slow(0.1, times=10**6))  # widen "stored there" .. "done here"
    config = fan_out_to(tmp_path, stub.base_url, orthanc.dicomweb_url)
    corpus = Corpus(f"{name}-{seed}", instances, per_study=20)
    target = Target()
    driver = KillDriver(
        lambda: stowaway("serve", "--destinations", str(config), *FAST_FORWARD, "--lease", "2s"),
        rng,
        on_start=lambda p: setattr(target, "port", p.port),
    )
    driver.launch()
    started = time.monotonic()
    pace = max(0.01, 3 * 6 / instances)
    threads = start_senders(
        corpus, target, ledger, 3, deadline=started + 60 + cycles * 6, pace=pace, retry_delay=0.1
    )
    done = lambda: all(not t.is_alive() for t in threads)  # noqa: E731
    driver.run(cycles, up=(0.4, 1.8), down=(0.0, 0.3), until=done)
    assert join_all(threads, 120) == 0, "senders could not deliver everything"
    wait_until(lambda: drained(db_url), timeout=120, interval=0.25)
    reports = [
        check_invariant(
            f"{name}-{label}",
            ledger,
            db_url=db_url,
            spool_dir=tmp_path / "data" / "spool",
            destination=destination,
            record_property=record_property,  # type: ignore[arg-type]
            seed=seed,
            kills=driver.kills,
            seconds=round(time.monotonic() - started, 1),
        )
        for label, destination in (
            ("cloud", StubDestination(stub)),
            ("local", OrthancDestination(orthanc)),
        )
    ]
    assert driver.current is not None
    end(driver.current)
    assert driver.kills >= min(cycles, 3), "the senders finished before serve was killed"
    for report in reports:
        assert report.in_destination == report.acknowledged == instances
    # Both deliveries done: no file a row points at is left behind. What may remain are
    # orphans: receipts killed after their file was renamed into place but before their
    # row committed (never acknowledged; the sender sent them again). Start-up only
    # counts those; `reconcile --fix` deletes them, and then the spool is empty.
    spool = tmp_path / "data" / "spool"
    referenced = {r.spool_path for r in queue_rows(db_url)}
    left = {str(f.relative_to(spool)) for f in spool.glob("[0-9]*/*/*/*/*.dcm")}
    assert not left & referenced, "a done instance's spool file was not deleted"
    report = run_cli(
        "reconcile",
        "--grace-age",
        "0s",
        "--fix",
        "--json",
        "--data-dir",
        str(tmp_path / "data"),
        "--db-url",
        db_url,
        check=True,
    )
    assert {o["path"] for o in json.loads(report.stdout)["orphans"]} == left
    assert not list(spool.glob("[0-9]*/*/*/*/*.dcm"))
