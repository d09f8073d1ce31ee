"""Storage commitment end to end: a real requester (Orthanc's storage commitment SCU, or a
pynetdicom SCU) asks stowaway, which forwards to a real Orthanc; the report commits
exactly what the destinations hold, never earlier, across a kill -9 and an unreachable
requester, and one report comes whichever of two processes on one Postgres queue is
asked."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from stowaway.db.commitments import CommitmentRecord, Commitments
from stowaway.db.engine import make_engine
from stowaway.db.models import CommitmentStatus, Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.support.commitment_scu import (
    ReportListener,
    references,
    request_on_one_association,
    send_n_action,
)
from tests.support.dicom_files import make_study, read_uids
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.processes import dcmsend, free_port
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(180)

CT = "1.2.840.10008.5.1.4.1.1.2"
NEVER_SENT = "1.2.826.0.1.3680043.8.498.1"
#: short everything: polls, backoff, settlement
FAST = (
    "--poll-interval",
    "100ms",
    "--backoff-initial",
    "200ms",
    "--backoff-max",
    "1s",
    "--sender-first",
    "0",
    "--commitment-poll",
    "200ms",
)


def dictionary(*entries: dict[str, Any]) -> tuple[str, str]:
    return ("--aet_dictionary_inline", json.dumps(list(entries)))


def sop_uids(files: list[Path]) -> set[str]:
    return {read_uids(p).sop_uid for p in files}


def commitments_json(proc: Any, *args: str) -> Any:
    """What the operator sees (``stowaway commitments ... --json``)."""
    done = proc.cli("commitments", *args, "--json")
    return json.loads(done.stdout)


def requests_in(db_url: str) -> list[CommitmentRecord]:
    """The requests as the queue holds them (cheaper to poll than the command)."""
    engine = make_engine(db_url)
    try:
        return Commitments(engine).rows()
    finally:
        engine.dispose()


@pytest.fixture
def requester(tmp_path: Path) -> Iterator[OrthancServer]:
    """An Orthanc standing in for the PACS that sends, then asks for commitment."""
    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "pacs", aet="PACS").start()
    yield server
    server.stop()


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[OrthancServer]:
    """A destination Orthanc at a known port, not started: each test decides when it is up."""
    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "destination", aet="DEST", http_port=free_port())
    yield server
    if server.is_running():
        server.stop()


def orthanc_commitment(
    pacs: OrthancServer, refs: list[tuple[str, str]], timeout: float = 60
) -> dict[str, Any]:
    """Orthanc's storage commitment SCU: N-ACTION to stowaway, then wait for its report."""
    asked = pacs.request(
        "POST",
        "/modalities/stowaway/storage-commitment",
        json={
            "DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in refs],
            "Timeout": 30,
        },
    )
    assert asked.status_code == 200, asked.text
    path = asked.json()["Path"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = pacs.get_json(path)
        if state["Status"] != "Pending":
            return state
        time.sleep(0.2)
    raise AssertionError(f"no storage commitment report within {timeout} s")


def test_orthanc_gets_success_for_what_the_destination_holds_and_0x0112_for_what_was_never_sent(
    stowaway: StowawayFactory, orthanc: OrthancServer, requester: OrthancServer, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 3, rows=8, cols=8, seed=161)
    proc = stowaway(
        "serve",
        "--dicomweb-url",
        orthanc.dicomweb_url,
        *dictionary({"name": "PACS", "host": "127.0.0.1", "port": requester.dicom_port}),
        *FAST,
    )
    declared = requester.request(
        "PUT",
        "/modalities/stowaway",
        json={"AET": "IMPORTADAPTER", "Host": "127.0.0.1", "Port": proc.port},
    )
    assert declared.status_code == 200, declared.text
    ids = [requester.request("POST", "/instances", data=p.read_bytes()).json()["ID"] for p in files]
    stored = requester.request(
        "POST", "/modalities/stowaway/store", json={"Resources": ids, "Synchronous": True}
    )
    assert stored.status_code == 200, stored.text

    state = orthanc_commitment(requester, [*references(files), (CT, NEVER_SENT)])

    assert state["Status"] == "Failure"
    assert {s["SOPInstanceUID"] for s in state["Success"]} == sop_uids(files)
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in state["Failures"]] == [
        (NEVER_SENT, 0x0112)
    ]
    # committed means in the destination, checked there
    assert sop_uids(files) <= orthanc.instance_uids()
    [listed] = commitments_json(proc, "ls")
    assert listed["status"] == "reported"
    assert listed["items"] == {"committed": 3, "failed": 1}
    assert listed["event_type"] == 2
    metrics = requests.get(f"http://127.0.0.1:{proc.http_port}/metrics", timeout=10).text
    assert 'stowaway_commitment_reports_sent_total{event_type="2"} 1.0' in metrics
    assert (
        'stowaway_commitment_failed_instances_total{reason="no_such_object_instance"} 1.0'
        in metrics
    )
    assert "stowaway_commitments_open 0.0" in metrics


def test_the_report_comes_on_the_requesters_open_association_once_the_destination_has_them(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=162)
    proc = stowaway(
        "serve",
        "--dicomweb-url",
        orthanc.dicomweb_url,
        # the requester's entry points nowhere: only its own association can carry it
        *dictionary({"name": "MODALITY", "host": "127.0.0.1", "port": free_port()}),
        *FAST,
    )
    sent = dcmsend(proc.port, files)
    assert sent.returncode == 0, sent.stderr

    status, report = request_on_one_association(proc.port, references(files), wait=60)

    assert status == 0x0000
    assert report is not None, proc.log()[-3000:]
    assert orthanc.instance_uids() >= sop_uids(files)  # there before the report came
    assert report.event_type == 1
    assert set(report.committed) == sop_uids(files)
    assert report.failed == {}
    assert "association=same" in proc.log()


def test_no_commitment_while_the_destination_is_down_and_the_report_once_it_is_back(
    stowaway: StowawayFactory, destination: OrthancServer, db_url: str, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=163)
    with ReportListener("MODALITY") as listener:
        proc = stowaway(
            "serve",
            "--dicomweb-url",
            f"http://127.0.0.1:{destination.http_port}/dicom-web",
            *dictionary(listener.entry()),
            *FAST,
        )
        sent = dcmsend(proc.port, files)
        assert sent.returncode == 0, sent.stderr
        refs = references(files)
        status, transaction = send_n_action(proc.port, refs)
        assert status == 0x0000
        # the same request again (its answer lost): still one request, one report
        again, _ = send_n_action(proc.port, refs, transaction_uid=transaction)
        assert again == 0x0000
        time.sleep(3)  # long enough for several looks at it
        assert listener.by_transaction(transaction) == []
        [open_] = requests_in(db_url)
        assert (open_.status, open_.settled_at) == (CommitmentStatus.OPEN, None)

        destination.start()
        wait_until(lambda: listener.by_transaction(transaction), 60)
        assert destination.instance_uids() >= sop_uids(files)
        time.sleep(1)
        [report] = listener.by_transaction(transaction)
        assert report.event_type == 1
        assert set(report.committed) == sop_uids(files)
        # on a new association stowaway opened, as the SCP (role selection accepted)
        assert listener.roles == [(True, False)]


def test_a_request_survives_kill_9_and_its_report_comes_after_the_restart(
    stowaway: StowawayFactory, destination: OrthancServer, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=164)
    with ReportListener("MODALITY") as listener:
        args = (
            "serve",
            "--dicomweb-url",
            f"http://127.0.0.1:{destination.http_port}/dicom-web",
            *dictionary(listener.entry()),
            # an upload in flight at the kill is taken over after its lease
            "--lease",
            "3s",
            *FAST,
        )
        first = stowaway(*args)
        sent = dcmsend(first.port, files)
        assert sent.returncode == 0, sent.stderr
        status, transaction = send_n_action(first.port, references(files))
        assert status == 0x0000
        first.kill()  # acknowledged, not reported: only the database remembers it

        destination.start()
        second = stowaway(*args)
        wait_until(lambda: listener.by_transaction(transaction), 60)
        [report] = listener.by_transaction(transaction)
        assert report.event_type == 1
        assert set(report.committed) == sop_uids(files)
        assert destination.instance_uids() >= sop_uids(files)
        wait_until(lambda: "commitment_reported" in second.log(), 10)


def test_the_report_reaches_a_requester_that_was_unreachable_for_a_while(
    stowaway: StowawayFactory, orthanc: OrthancServer, db_url: str, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=165)
    listener = ReportListener("MODALITY")  # not listening yet
    proc = stowaway(
        "serve", "--dicomweb-url", orthanc.dicomweb_url, *dictionary(listener.entry()), *FAST
    )
    sent = dcmsend(proc.port, files)
    assert sent.returncode == 0, sent.stderr
    status, transaction = send_n_action(proc.port, references(files))
    assert status == 0x0000

    def attempts() -> int:
        [row] = requests_in(db_url)
        return row.report_attempts if row.status == CommitmentStatus.OPEN else -1

    wait_until(lambda: attempts() >= 2, 60)
    [row] = requests_in(db_url)
    assert "MODALITY@127.0.0.1" in (row.last_error or "")
    with listener:
        wait_until(lambda: listener.by_transaction(transaction), 60)
    [report] = listener.by_transaction(transaction)
    assert report.event_type == 1
    wait_until(lambda: requests_in(db_url)[0].status == CommitmentStatus.REPORTED, 30)


def test_a_destination_failing_permanently_fails_only_the_instances_routed_to_it(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    from tests.support.healthcare_stub import Fault, HealthcareStub

    ct = make_study(tmp_path / "ct", 2, rows=8, cols=8, seed=166)
    mg = make_study(tmp_path / "mg", 2, rows=8, cols=8, seed=167)
    for path in mg:
        ds = pydicom.dcmread(path)
        ds.Modality = "MG"
        ds.save_as(path, enforce_file_format=True)
    with HealthcareStub() as broken, ReportListener("MODALITY") as listener:
        broken.fault = Fault.http(400, body="refused", times=10**6)
        config = tmp_path / "destinations.yaml"
        config.write_text(
            "destinations:\n"
            f"  - {{name: clinical, kind: dicomweb, url: '{orthanc.dicomweb_url}', auth: none}}\n"
            f"  - {{name: research, kind: dicomweb, url: '{broken.base_url}', auth: none}}\n"
            "matching: all\n"
            "rules:\n"
            "  - {name: everything, to: [clinical]}\n"
            "  - {name: mammography, when: {Modality: MG}, to: [research]}\n"
        )
        proc = stowaway(
            "serve", "--destinations", str(config), *dictionary(listener.entry()), *FAST
        )
        sent = dcmsend(proc.port, [*ct, *mg])
        assert sent.returncode == 0, sent.stderr
        status, transaction = send_n_action(proc.port, references([*ct, *mg]))
        assert status == 0x0000
        wait_until(lambda: listener.by_transaction(transaction), 60)
    [report] = listener.by_transaction(transaction)
    assert report.event_type == 2
    assert set(report.committed) == sop_uids(ct)
    assert report.failed == {uid: 0x0110 for uid in sop_uids(mg)}
    assert orthanc.instance_uids() >= sop_uids(ct) | sop_uids(mg)
    [shown] = commitments_json(proc, "show", transaction)
    failed = [i for i in shown["items"] if i["result"] == "failed"]
    assert all("delivery to research failed" in i["detail"] for i in failed)


def test_with_verify_an_instance_the_destination_no_longer_holds_is_not_committed(
    stowaway: StowawayFactory, orthanc: OrthancServer, db_url: str, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=169)
    kept, lost = sorted(sop_uids(files))
    with ReportListener("MODALITY") as listener:
        proc = stowaway(
            "serve",
            "--dicomweb-url",
            orthanc.dicomweb_url,
            "--commitment-verify",
            "--commitment-timeout",
            "4s",
            *dictionary(listener.entry()),
            *FAST,
        )
        sent = dcmsend(proc.port, files)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: all_done(db_url, 2), 60)
        # the store lost one after it confirmed it: the queue still says done
        removed = orthanc.request("DELETE", f"/instances/{orthanc.orthanc_id(lost)}")
        assert removed.status_code == 200, removed.text
        status, transaction = send_n_action(proc.port, references(files))
        assert status == 0x0000
        wait_until(lambda: listener.by_transaction(transaction), 60)
    [report] = listener.by_transaction(transaction)
    assert report.committed == (kept,)
    assert report.failed == {lost: 0x0110}


def all_done(db_url: str, count: int) -> bool:
    engine = make_engine(db_url)
    try:
        queue = Queue(engine)
        done = len(queue.rows(status=Status.DONE))
        queue.close()
        return done == count
    finally:
        engine.dispose()


def test_an_unknown_requester_is_refused_as_googles_adapter_refuses_it(
    stowaway: StowawayFactory, db_url: str
) -> None:
    proc = stowaway("receive", *dictionary({"name": "KNOWN", "host": "127.0.0.1", "port": 1}))
    status, _ = send_n_action(proc.port, [(CT, NEVER_SENT)], aet="STRANGER")
    assert status == 0x0110
    wait_until(lambda: "Unknown AET" in proc.log(), 10)
    # a known requester's malformed request: refused with what is wrong, nothing kept
    no_items = Dataset()
    no_items.TransactionUID = "1.2.3.4"
    status, _ = send_n_action(proc.port, [], aet="KNOWN", information=no_items)
    assert status == 0x0115
    wait_until(lambda: "Referenced SOP Sequence (0008,1150) empty" in proc.log(), 10)
    assert requests_in(db_url) == []


@pytest.mark.postgres
def test_two_processes_on_one_postgres_queue_send_one_correct_report(
    stowaway: StowawayFactory, orthanc: OrthancServer, db_url: str, tmp_path: Path
) -> None:
    if not db_url.startswith("postgres"):
        pytest.skip("several processes share a Postgres queue")
    files = make_study(tmp_path / "study", 3, rows=8, cols=8, seed=168)
    with ReportListener("MODALITY") as listener:
        common = (
            "--dicomweb-url",
            orthanc.dicomweb_url,
            *dictionary(listener.entry()),
            *FAST,
        )
        one = stowaway("serve", "--node-id", "one", *common, data_dir=tmp_path / "one")
        other = stowaway("serve", "--node-id", "other", *common, data_dir=tmp_path / "other")
        sent = dcmsend(one.port, files)
        assert sent.returncode == 0, sent.stderr
        # asked of the process that never saw the instances
        status, transaction = send_n_action(other.port, [*references(files), (CT, NEVER_SENT)])
        assert status == 0x0000
        wait_until(lambda: listener.by_transaction(transaction), 60)
        time.sleep(2)  # a second report, if any, would have come by now
    [report] = listener.by_transaction(transaction)
    assert report.event_type == 2
    assert set(report.committed) == sop_uids(files)
    assert report.failed == {NEVER_SENT: 0x0112}
    reported = [p for p in (one, other) if "commitment_reported" in p.log()]
    assert len(reported) == 1, "exactly one process sent the report"


# -- serve --processes 2: each receiver process answers N-ACTIONs and reports ----------

#: two receiver processes behind the acceptor
PROCESSES = {"STOWAWAY_PROCESSES": "2"}


def metric(proc: Any, line: str) -> bool:
    """Whether the main process's /metrics holds ``line``."""
    text = requests.get(f"http://127.0.0.1:{proc.http_port}/metrics", timeout=10).text
    return line in text.splitlines()


def receiver_pids(proc: Any) -> dict[int, int]:
    """The receiver processes that started, by index (the latest of each)."""
    pids: dict[int, int] = {}
    for line in proc.log().splitlines():
        if "receiver_process_ready" in line:
            fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
            pids[int(fields["receiver_process"])] = int(fields["pid"])
    return pids


def test_with_processes_orthanc_gets_one_correct_report_and_the_main_process_counts_it(
    stowaway: StowawayFactory, orthanc: OrthancServer, requester: OrthancServer, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 3, rows=8, cols=8, seed=171)
    proc = stowaway(
        "serve",
        "--dicomweb-url",
        orthanc.dicomweb_url,
        *dictionary({"name": "PACS", "host": "127.0.0.1", "port": requester.dicom_port}),
        *FAST,
        env=PROCESSES,
    )
    wait_until(lambda: len(receiver_pids(proc)) == 2, 30)
    declared = requester.request(
        "PUT",
        "/modalities/stowaway",
        json={"AET": "IMPORTADAPTER", "Host": "127.0.0.1", "Port": proc.port},
    )
    assert declared.status_code == 200, declared.text
    ids = [requester.request("POST", "/instances", data=p.read_bytes()).json()["ID"] for p in files]
    stored = requester.request(
        "POST", "/modalities/stowaway/store", json={"Resources": ids, "Synchronous": True}
    )
    assert stored.status_code == 200, stored.text

    state = orthanc_commitment(requester, references(files))

    assert state["Status"] == "Success", state
    assert {s["SOPInstanceUID"] for s in state["Success"]} == sop_uids(files)
    assert state["Failures"] == []
    assert sop_uids(files) <= orthanc.instance_uids()
    one_report = 'stowaway_commitment_reports_sent_total{event_type="1"} 1.0'
    wait_until(lambda: metric(proc, one_report), 10)
    assert metric(proc, 'stowaway_commitment_requests_total{outcome="new"} 1.0')
    time.sleep(1)  # a second report, if any, would have been counted by now
    assert metric(proc, one_report)
    assert proc.log().count("commitment_reported") == 1
    [listed] = commitments_json(proc, "ls")
    assert (listed["status"], listed["event_type"]) == ("reported", 1)


def test_with_processes_a_requester_keeping_its_association_open_gets_one_report_on_it(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=172)
    # reachable both ways: on its open association, and at its listener
    with ReportListener("MODALITY") as listener:
        proc = stowaway(
            "serve",
            "--dicomweb-url",
            orthanc.dicomweb_url,
            *dictionary(listener.entry()),
            *FAST,
            env=PROCESSES,
        )
        wait_until(lambda: len(receiver_pids(proc)) == 2, 30)
        sent = dcmsend(proc.port, files)
        assert sent.returncode == 0, sent.stderr

        status, same = request_on_one_association(proc.port, references(files), wait=8)
        assert status == 0x0000
        wait_until(lambda: same is not None or listener.reports, 60)
        time.sleep(2)  # a second report, if any, would have come by now
        reports = [*([same] if same else []), *listener.reports]
    assert len(reports) == 1, (reports, proc.log()[-3000:])
    # the process that took the N-ACTION holds the association: the report goes on it
    assert same is not None, ("the report went on a new association", proc.log()[-3000:])
    [report] = reports
    assert report.event_type == 1
    assert set(report.committed) == sop_uids(files)
    assert report.failed == {}
    assert orthanc.instance_uids() >= sop_uids(files)
    assert proc.log().count("commitment_reported") == 1


def test_with_processes_the_report_comes_after_kill_9_of_the_receiver_process_that_took_it(
    stowaway: StowawayFactory, destination: OrthancServer, db_url: str, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", 2, rows=8, cols=8, seed=173)
    with ReportListener("MODALITY") as listener:
        proc = stowaway(
            "serve",
            "--dicomweb-url",
            f"http://127.0.0.1:{destination.http_port}/dicom-web",
            *dictionary(listener.entry()),
            *FAST,
            env=PROCESSES,
        )
        wait_until(lambda: len(receiver_pids(proc)) == 2, 30)
        sent = dcmsend(proc.port, files)
        assert sent.returncode == 0, sent.stderr
        status, transaction = send_n_action(proc.port, references(files))
        assert status == 0x0000
        [line] = [ln for ln in proc.log().splitlines() if "commitment_requested" in ln]
        fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
        took = receiver_pids(proc)[int(fields["receiver_process"])]
        time.sleep(1)  # it looks at the request (holding its lease, at times) meanwhile
        os.kill(took, signal.SIGKILL)
        wait_until(lambda: "receiver_process_exited" in proc.log(), 10)
        wait_until(lambda: receiver_pids(proc).get(int(fields["receiver_process"])) != took, 30)

        destination.start()
        wait_until(lambda: listener.by_transaction(transaction), 60)
        time.sleep(2)  # a second report, if any, would have come by now
        [report] = listener.by_transaction(transaction)
    assert report.event_type == 1
    assert set(report.committed) == sop_uids(files)
    assert destination.instance_uids() >= sop_uids(files)
    wait_until(lambda: requests_in(db_url)[0].status == CommitmentStatus.REPORTED, 10)
