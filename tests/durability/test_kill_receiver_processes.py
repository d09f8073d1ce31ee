"""kill -9 of single receiver processes of ``--processes 2`` while several associations send.

The main process stays up and starts each killed process again; the associations
it was serving are aborted and their senders send again what was not
acknowledged, to whichever process the main one hands the new association. At
the end a forwarder drains the queue into the Healthcare API stub and the
invariant is checked: nothing acknowledged is missing or different, nothing
unsent appears.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    Scenario,
    ScenarioFactory,
    StubDestination,
    Target,
    backend,
    drained,
    end,
    join_all,
    scaled,
    start_senders,
)
from tests.support.healthcare_stub import HealthcareStub
from tests.support.processes import StowawayProcess
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def receiver_processes(proc: StowawayProcess) -> list[int]:
    """The main process's children: its receiver processes."""
    assert proc.proc is not None
    pids: list[int] = []
    for task in Path(f"/proc/{proc.proc.pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(pids)


def readyz(proc: StowawayProcess) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/readyz", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def kill_receiver_processes_scenario(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    run: Scenario,
    *,
    instances: int,
    kills: int,
    senders: int,
) -> None:
    proc = stowaway("receive", "--processes", "2")
    wait_until(lambda: "2/2 receiver processes" in readyz(proc), timeout=60)
    corpus = run.corpus(instances)
    started = time.monotonic()
    threads = start_senders(
        corpus,
        Target(proc.port),
        run.ledger,
        senders,
        deadline=started + 60 + kills * 8,
        # Paced to outlast the kills, however fast the receiver processes are.
        pace=max(0.005, senders * kills * 1.5 / instances),
        retry_delay=0.1,
        # New associations all along, so that both processes always serve some.
        per_association=20,
    )
    killed = 0
    while killed < kills and any(t.is_alive() for t in threads):
        time.sleep(run.rng.uniform(0.3, 1.2))
        pids = receiver_processes(proc)
        if len(pids) < 2:
            continue  # one is being started again: wait for it
        os.kill(run.rng.choice(pids), signal.SIGKILL)
        killed += 1
        wait_until(lambda: len(receiver_processes(proc)) == 2, timeout=30, interval=0.1)
    assert join_all(threads, 150) == 0, "senders could not deliver everything"
    receiving = time.monotonic() - started
    assert proc.proc is not None and proc.proc.poll() is None, "the main process died"
    restarts = proc.log().count("receiver_process_exited")
    end(proc)

    forwarder = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST_FORWARD)
    wait_until(lambda: drained(run.db_url), timeout=120, interval=0.25)
    report = run.check(
        StubDestination(stub), kills=killed, restarts=restarts, seconds=round(receiving, 1)
    )
    end(forwarder)
    assert killed >= min(kills, 3), "the senders finished before the processes were killed"
    assert restarts == killed
    assert report.statuses.get("none", 0) >= 1, "no kill aborted an association"
    assert report.acknowledged == instances
    assert report.in_destination == instances


def test_kill_9_of_receiver_processes_loses_nothing_acknowledged(
    stowaway: StowawayFactory, stub: HealthcareStub, db_url: str, scenario: ScenarioFactory
) -> None:
    kill_receiver_processes_scenario(
        stowaway,
        stub,
        scenario(f"kill-receiver-processes-{backend(db_url)}", db_url),
        instances=scaled(400),
        kills=scaled(5),
        senders=4,
    )
