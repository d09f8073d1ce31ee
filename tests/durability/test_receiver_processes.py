"""``--processes 2``: one accepting process, two receiver processes, one queue and spool.

Real processes over loopback: pynetdicom senders (the durability harness's, which
record every response) over several associations; the receiver processes are
found as the main process's children and killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    Ledger,
    NoDestination,
    Scenario,
    ScenarioFactory,
    Target,
    backend,
    join_all,
    queue_rows,
    spool_files,
    start_senders,
    wait_for_log,
)
from tests.support.processes import StowawayProcess
from tests.support.seeding import wait_until

pytestmark = [
    pytest.mark.timeout(180),
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


def http_get(proc: StowawayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match.group(1))


def start_two(stowaway: StowawayFactory, *extra: str) -> StowawayProcess:
    proc = stowaway("serve", "--processes", "2", *extra)
    wait_until(lambda: len(receiver_processes(proc)) == 2, timeout=30)
    wait_until(lambda: "2/2 receiver processes" in http_get(proc, "/readyz")[1], timeout=30)
    return proc


def landed_once(run: Scenario, ledger: Ledger, *, orphans: bool = False) -> None:
    """Every acknowledged instance has exactly one pending row, and its spool file;
    ``orphans``: a kill may also have left files whose row was never committed
    (``stowaway reconcile`` removes them), never a row without its file."""
    report = run.check(NoDestination())
    rows = queue_rows(run.db_url)
    per_uid = Counter(r.sop_instance_uid for r in rows)
    assert set(per_uid) >= ledger.acked
    assert max(per_uid.values()) == 1, "an instance has two rows"
    files = len(spool_files(run.spool_dir))
    assert files >= len(rows) if orphans else files == len(rows), "a spool file without a row"
    assert report.lost == []


def test_instances_over_several_associations_land_once_in_one_queue_and_spool(
    stowaway: StowawayFactory, db_url: str, scenario: ScenarioFactory
) -> None:
    run = scenario(f"processes-land-once-{backend(db_url)}", db_url)
    proc = start_two(stowaway)
    corpus = run.corpus(120)
    target = Target(proc.port)
    senders = start_senders(
        corpus, target, run.ledger, 4, deadline=time.monotonic() + 90, per_association=10
    )
    assert join_all(senders, 120) == 0
    landed_once(run, run.ledger)
    assert len(run.ledger.acked) == 120
    # Both processes served: 12 associations of each sender's 10 instances.
    log = proc.log()
    served = Counter(re.findall(r"instance_stored .*receiver_process=(\d)", log))
    assert set(served) == {"0", "1"}, served
    assert sum(served.values()) == 120
    status, text = http_get(proc, "/metrics")
    assert status == 200
    assert metric(text, 'stowaway_instances_received_total{status="success"}') == 120
    assert metric(text, 'stowaway_associations_total{outcome="accepted"}') == sum(
        s.associations for s in senders
    )
    wait_until(
        lambda: metric(http_get(proc, "/metrics")[1], "stowaway_associations_open") == 0,
        timeout=10,
    )
    assert metric(text, "stowaway_receiver_processes") == 2
    assert proc.stop() == 0


def test_sigterm_drains_every_receiver_process_and_exits_0(
    stowaway: StowawayFactory, db_url: str, scenario: ScenarioFactory
) -> None:
    run = scenario(f"processes-sigterm-{backend(db_url)}", db_url)
    proc = start_two(stowaway, "--grace-period", "60")
    workers = receiver_processes(proc)
    corpus = run.corpus(400)
    # One association each, about 4 s long: SIGTERM lands in the middle of all four.
    senders = start_senders(
        corpus, Target(proc.port), run.ledger, 4, deadline=time.monotonic() + 90, pace=0.01
    )
    wait_until(lambda: len(run.ledger.acked) >= 20, timeout=30)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(90)
    assert join_all(senders, 30) == 0, "an association in progress was cut"
    assert code == 0
    assert len(run.ledger.acked) == 400
    assert sum(s.associations for s in senders) == 4
    log = proc.log()
    assert log.count("receiver_process_stopped") == 2
    assert "receiver_process_exited" not in log, "a receiver process was restarted while stopping"
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    landed_once(run, run.ledger)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_kill_9_of_a_receiver_process_restarts_it_and_nothing_acknowledged_is_lost(
    stowaway: StowawayFactory, db_url: str, scenario: ScenarioFactory
) -> None:
    run = scenario(f"processes-kill-one-{backend(db_url)}", db_url)
    proc = start_two(stowaway)
    victim = receiver_processes(proc)[0]
    corpus = run.corpus(300)
    senders = start_senders(
        corpus,
        Target(proc.port),
        run.ledger,
        4,
        deadline=time.monotonic() + 120,
        pace=0.005,
        retry_delay=0.1,
    )
    wait_until(lambda: len(run.ledger.acked) >= 40, timeout=30)
    os.kill(victim, signal.SIGKILL)
    wait_for_log(proc, "receiver_process_exited", timeout=20)
    wait_until(lambda: len(receiver_processes(proc)) == 2, timeout=30)
    assert victim not in receiver_processes(proc)
    assert join_all(senders, 150) == 0, "senders could not deliver everything"
    # The aborted associations were sent again, on the processes still up.
    assert run.ledger.statuses["none"] >= 1, "the kill aborted no association"
    landed_once(run, run.ledger, orphans=True)
    wait_until(lambda: "2/2 receiver processes" in http_get(proc, "/readyz")[1], timeout=30)
    _status, text = http_get(proc, "/metrics")
    assert metric(text, "stowaway_receiver_process_restarts_total") == 1
    assert metric(text, 'stowaway_instances_received_total{status="success"}') >= 300
    wait_until(
        lambda: metric(http_get(proc, "/metrics")[1], "stowaway_associations_open") == 0,
        timeout=10,
    )
    assert proc.stop() == 0


def test_receiver_processes_die_with_the_main_process(stowaway: StowawayFactory) -> None:
    proc = start_two(stowaway)
    workers = receiver_processes(proc)
    proc.kill()
    wait_until(lambda: all(not Path(f"/proc/{p}").exists() or _zombie(p) for p in workers), 10)


def test_readyz_names_the_receiver_processes(stowaway: StowawayFactory) -> None:
    proc = start_two(stowaway)
    status, body = http_get(proc, "/readyz")
    assert status == 200
    assert json.loads(body)["checks"]["receivers"] == {
        "ok": True,
        "detail": "2/2 receiver processes",
    }
