"""`stowaway queue ls|show|stats|requeue|purge` and `stowaway reconcile` as real processes,
on SQLite and Postgres."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from stowaway.db.engine import make_engine
from stowaway.db.models import DestinationState, Instance, Status, utcnow
from stowaway.db.queue import Queue, QueuedInstance
from stowaway.db.spool import Spool
from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_ct, make_study, read_uids
from tests.support.processes import dcmsend, run_cli
from tests.support.seeding import seed_queue

pytestmark = pytest.mark.timeout(180)

LEASE = timedelta(minutes=5)
HOUR = 3600
ERROR_403 = (
    "the service account lacks roles/healthcare.dicomEditor on the DICOM store: grant it "
    "[Http_403, PERMISSION_DENIED, Permission 'healthcare.dicomStores.d]"
)

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cli(data: Path, db_url: str) -> Cli:
    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--data-dir", str(data), "--db-url", db_url, check=check)

    return run


@pytest.fixture
def q(db_url: str) -> Iterator[Queue]:
    engine = make_engine(db_url)
    yield Queue(engine)
    engine.dispose()


def seed(tmp_path: Path, db_url: str, data: Path, n: int, seed_value: int = 1) -> list[int]:
    files = make_study(tmp_path / f"study-{seed_value}", n, seed=seed_value)
    return seed_queue(db_url, data, files)


def fail_rows(q: Queue, ids: list[int], error: str = ERROR_403) -> None:
    """Claim every due row and fail those in ``ids`` (the rest go back untouched)."""
    claimed = []  # a claim takes one study's rows: claim until nothing is due
    while batch := q.claim_batch("op-test", 10_000, LEASE):
        claimed.extend(batch)
    for row in claimed:
        if row.id in ids:
            q.fail(row.id, "op-test", error)
        else:
            q.release(row.id, "op-test")


def spool_file(q: Queue, data: Path, row_id: int) -> Path:
    row = q.get(row_id)
    assert row is not None
    return data / "spool" / row.spool_path


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# ---------------------------------------------------------------------- ls / show / stats


def test_ls_filters_by_study_and_since(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    old = seed(tmp_path, db_url, data, 3, seed_value=1)
    new = seed(tmp_path, db_url, data, 2, seed_value=2)
    with q.engine.begin() as conn:
        conn.execute(
            update(Instance)
            .where(Instance.id.in_(old))
            .values(received_at=utcnow() - timedelta(days=3))
        )
    study = q.get(new[0]).study_instance_uid  # type: ignore[union-attr]
    rows = json.loads(cli("queue", "ls", "--study", study, "--json", check=True).stdout)
    assert [r["id"] for r in rows] == new
    rows = json.loads(cli("queue", "ls", "--since", "1d", "--json", check=True).stdout)
    assert [r["id"] for r in rows] == new
    rows = json.loads(cli("queue", "ls", "--since", "2000-01-01", "--json", check=True).stdout)
    assert [r["id"] for r in rows] == old + new
    table = cli("queue", "ls", "--status", "pending", check=True).stdout
    assert table.splitlines()[0].split()[:4] == ["ID", "SOP", "INSTANCE", "UID"]
    assert len(table.splitlines()) == 6


def test_show_by_id_and_by_uid(cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path) -> None:
    [row_id, other] = seed(tmp_path, db_url, data, 2)
    fail_rows(q, [row_id])
    text = cli("queue", "show", str(row_id), check=True).stdout
    assert ERROR_403 in text  # the full error, not shortened
    path = spool_file(q, data, row_id)
    assert f"{path} (present, intact)" in text
    assert "history:" in text and "failed" in text
    detail = json.loads(cli("queue", "show", str(row_id), "--json", check=True).stdout)
    assert detail["id"] == row_id and detail["status"] == "failed"
    assert detail["spool_file"] == {
        "absolute_path": str(path),
        "present": True,
        "intact": True,
        "problem": None,
    }
    assert [e["kind"] for e in detail["events"]] == ["failed"]
    sop = detail["sop_instance_uid"]
    by_uid = json.loads(cli("queue", "show", sop, "--json", check=True).stdout)
    assert [d["id"] for d in by_uid] == [row_id]
    corrupt = spool_file(q, data, other)
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x01")
    text = cli("queue", "show", str(other), check=True).stdout
    assert "CORRUPT: spool file checksum does not match" in text
    missing = cli("queue", "show", "999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "stowaway: no queue row with id 999"


def test_stats_show_destination_state_and_the_last_hour(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    ids = seed(tmp_path, db_url, data, 3)
    fail_rows(q, ids[:1])
    [row] = q.claim_batch("w", 1, LEASE)
    q.complete(row.id, "w")
    url = "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
    q.set_destination("default", DestinationState.BLOCKED, ERROR_403, utcnow(), url)
    stats = json.loads(cli("queue", "stats", "--json", check=True).stdout)
    assert (stats["pending"], stats["failed"], stats["done"]) == (1, 1, 1)
    [dest] = stats["destinations"]
    assert dest["url"] == url and dest["state"] == "blocked" and dest["reason"] == ERROR_403
    assert (dest["name"], dest["pending"], dest["failed"]) == ("default", 1, 1)
    assert stats["last_hour"] == {"uploaded": 1, "failed": 1, "retried": 0}
    text = cli("queue", "stats", check=True).stdout
    assert f"destination default ({url}): 1 waiting, 1 failed; blocked since" in text
    assert ERROR_403 in text
    assert "last hour: 1 uploaded, 1 failed, 0 retried" in text
    other = json.loads(
        cli("queue", "stats", "--json", "--dicomweb-url", "http://127.0.0.1:1/x", check=True).stdout
    )
    assert other["destinations"] == [
        {
            "name": "default",
            "pending": 1,
            "failed": 1,
            "oldest_pending_received_at": other["destinations"][0]["oldest_pending_received_at"],
            "url": "http://127.0.0.1:1/x",
            "state": "unknown",
            "since": None,
            "reason": None,
            "next_probe_at": None,
        }
    ]


# ---------------------------------------------------------------------- requeue


def test_requeue_failed_rows(cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path) -> None:
    study_a = seed(tmp_path, db_url, data, 3, seed_value=1)
    study_b = seed(tmp_path, db_url, data, 2, seed_value=2)
    fail_rows(q, study_a + study_b)
    uid_b = q.get(study_b[0]).study_instance_uid  # type: ignore[union-attr]
    result = cli("queue", "requeue", "--status", "failed", "--study", uid_b, check=True)
    assert result.stdout.strip() == "requeued 2 row(s)"
    assert [r.id for r in q.rows(status=Status.PENDING)] == study_b
    result = cli("queue", "requeue", "--failed", "--json", check=True)
    assert json.loads(result.stdout)["requeued"] == 3
    assert result.stderr == ""  # no progress output in --json mode
    for row in q.rows():
        assert row.status == Status.PENDING and row.attempts == 0 and row.last_error is None
        assert [k for _at, k, _d in q.events(row.id)] == ["failed", "requeued"]
        assert q.events(row.id)[-1][2] == ERROR_403  # the old error, kept in history


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "requeue"),
        ("queue", "requeue", "1", "--failed"),
        ("queue", "requeue", "1", "--study", "1.2.3"),
        ("queue", "requeue", "abc"),
        ("queue", "purge", "--done", "--failed"),
        ("queue", "purge", "--failed", "--older-than", "7"),
        ("queue", "ls", "--since", "last tuesday"),
        ("reconcile", "--grace-age", "soon"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    # Refused while parsing, before any database is opened: no need for both databases.
    result = run_cli(*args, "--data-dir", str(tmp_path / "data"), check=False)
    assert result.returncode == 2, args
    assert "Traceback" not in result.stderr
    assert f"stowaway {args[0]}" in result.stderr.strip().splitlines()[-1]
    assert ": error: " in result.stderr.strip().splitlines()[-1]


def test_requeue_leaves_a_live_lease_alone(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    [held, free] = seed(tmp_path, db_url, data, 2)
    q.claim_batch("busy-forwarder", 1, LEASE)
    result = cli("queue", "requeue", str(held), str(free), "777")
    assert result.returncode == 1
    assert "requeued 1 row(s)" in result.stdout
    assert "1 left alone: in_flight under a live lease" in result.stdout
    assert "1 not found: 777" in result.stdout
    row = q.get(held)
    assert row is not None and row.status == Status.IN_FLIGHT
    assert row.lease_owner == "busy-forwarder"


# ---------------------------------------------------------------------- purge


def test_purge_without_yes_and_without_a_terminal_refuses(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    ids = seed(tmp_path, db_url, data, 3)
    fail_rows(q, ids)
    result = cli("queue", "purge", "--failed")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "stowaway: refusing to purge 3 row(s) without --yes (no terminal to ask on)"
    )
    assert result.stdout.startswith("would purge 3 row(s), ")
    assert str(ids[0]) in result.stdout
    assert len(q.rows()) == 3
    assert all(spool_file(q, data, i).exists() for i in ids)


def test_purge_with_yes_removes_rows_and_files(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    ids = seed(tmp_path, db_url, data, 4)
    fail_rows(q, ids[:3])
    files = {i: spool_file(q, data, i) for i in ids}
    with q.engine.begin() as conn:  # one failed row is recent: --older-than keeps it
        conn.execute(
            update(Instance)
            .where(Instance.id.in_(ids[:2]))
            .values(received_at=utcnow() - timedelta(days=8))
        )
    result = cli("queue", "purge", "--failed", "--older-than", "7d", "--yes", check=True)
    assert result.stdout.startswith("purged 2 row(s), ")
    assert "removed 2 spool file(s)" in result.stdout
    assert [r.id for r in q.rows()] == ids[2:]
    assert not files[ids[0]].exists() and not files[ids[1]].exists()
    assert files[ids[2]].exists() and files[ids[3]].exists()
    out = json.loads(cli("queue", "purge", str(ids[3]), "--yes", "--json", check=True).stdout)
    assert out["purged"] == 1 and out["files_removed"] == 1 and out["not_found"] == []
    assert [r.id for r in q.rows()] == [ids[2]]
    assert cli("queue", "purge", "--done", "--yes", check=True).stdout.strip() == "nothing to purge"


def _run_on_terminal(args: list[str], answer: bytes, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; answer its question."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stowaway.cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    output = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if not answered and b"[y/N]" in output:
                os.write(master, answer)
                answered = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, output.decode(errors="replace")


def test_purge_on_a_terminal_asks_first(q: Queue, tmp_path: Path, db_url: str, data: Path) -> None:
    ids = seed(tmp_path, db_url, data, 2)
    fail_rows(q, ids)
    args = ["queue", "purge", "--failed", "--data-dir", str(data), "--db-url", db_url]
    code, output = _run_on_terminal(args, b"n\n")
    assert code == 1, output
    assert "would purge 2 row(s)" in output and "Delete these 2 row(s)" in output
    assert len(q.rows()) == 2
    code, output = _run_on_terminal(args, b"y\n")
    assert code == 0, output
    assert "purged 2 row(s)" in output
    assert "purge 2/2" in output  # progress, on a terminal
    assert q.rows() == []


def test_a_purge_that_died_halfway_is_finished_by_reconcile(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    ids = seed(tmp_path, db_url, data, 3)
    fail_rows(q, ids)
    files = [spool_file(q, data, i) for i in ids]
    # The rows' transaction committed; the process died before deleting the files.
    purged = q.purge(ids, [Status.FAILED])
    paths = purged.unreferenced_paths
    assert list(purged.deleted) == ids and len(paths) == 3
    assert all(f.exists() for f in files)
    # No row points at a missing file; the files are orphans.
    report = cli("reconcile", "--grace-age", "0s", "--json")
    assert report.returncode == 1
    found = json.loads(report.stdout)
    assert sorted(o["path"] for o in found["orphans"]) == sorted(paths)
    assert found["broken_rows"] == []
    fixed = cli("reconcile", "--grace-age", "0s", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "fixed: 3 problem(s)" in fixed.stdout
    assert not any(f.exists() for f in files)
    assert cli("reconcile", check=True).stdout.strip().endswith("ok: the spool and the queue agree")


# ---------------------------------------------------------------------- reconcile


def test_reconcile_crafted_crash_states(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    ids = seed(tmp_path, db_url, data, 5)
    missing, corrupt, expired, healthy, _spare = ids
    spool_file(q, data, missing).unlink()
    target = spool_file(q, data, corrupt)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    # a forwarder died holding `expired`: take it with an already expired lease
    for row in q.claim_batch("dead-forwarder", 10, timedelta(seconds=-1)):
        if row.id != expired:
            q.release(row.id, "dead-forwarder")
    # a receipt that was fsynced but never committed, an hour and a half ago
    orphan_src = make_ct(tmp_path / "orphan.dcm", seed=99)
    spool = Spool(data / "spool")
    with orphan_src.open("rb") as f:
        orphan = spool.write(b"", f, utcnow())
    age(data / "spool" / orphan.relative_path, 1.5 * HOUR)

    report = cli("reconcile")
    assert report.returncode == 1, report.stdout + report.stderr
    out = report.stdout
    assert "spool files with no queue row, older than 60m: 1" in out
    assert orphan.relative_path in out
    assert "rows whose spool file is missing or corrupt: 2" in out
    assert f"row {missing} " in out and "spool file is missing" in out
    assert f"row {corrupt} " in out and "checksum does not match" in out
    assert "leases held past expiry: 1" in out and "dead-forwarder" in out
    assert "4 problem(s) remain: run `stowaway reconcile --fix` to repair" in out
    assert q.get(missing).status == Status.PENDING  # type: ignore[union-attr]

    fixed = cli("reconcile", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "fixed: 4 problem(s)" in fixed.stdout
    assert not (data / "spool" / orphan.relative_path).exists()
    assert q.get(missing).status == Status.FAILED  # type: ignore[union-attr]
    assert "spool file is missing" in (q.get(missing).last_error or "")  # type: ignore[union-attr]
    assert q.get(corrupt).status == Status.FAILED  # type: ignore[union-attr]
    assert q.get(expired).status == Status.PENDING  # type: ignore[union-attr]
    assert q.get(healthy).status == Status.PENDING  # type: ignore[union-attr]

    again = cli("reconcile", "--json", check=True)
    report_json = json.loads(again.stdout)
    assert report_json["problems"] == 0 and report_json["recorded_broken_rows"] == 2
    # the operator clears the broken rows; nothing is left to reconcile
    cli("queue", "purge", "--failed", "--yes", check=True)
    assert json.loads(cli("reconcile", "--json", check=True).stdout)["recorded_broken_rows"] == 0


def test_reconcile_adopts_an_orphan_receipt(
    cli: Cli, q: Queue, tmp_path: Path, db_url: str, data: Path
) -> None:
    from stowaway.db.part10 import dataset_offset, part10_header

    source = make_ct(tmp_path / "lost.dcm", seed=5)
    uids = read_uids(source)
    spool = Spool(data / "spool")
    spool.prepare()
    with source.open("rb") as f:
        f.seek(dataset_offset(f))
        header = part10_header(uids.sop_class_uid, uids.sop_uid, "1.2.840.10008.1.2.1")
        written = spool.write(header, f, utcnow())
    age(data / "spool" / written.relative_path, 2 * HOUR)
    result = cli("reconcile", "--adopt")
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = q.rows()
    assert f"adopted as row {row.id}" in result.stdout
    assert row.sop_instance_uid == uids.sop_uid and row.study_instance_uid == uids.study_uid
    assert row.status == Status.PENDING and row.spool_path == written.relative_path
    assert row.sha256 == written.sha256


ADOPT_DESTINATIONS = """\
destinations:
  - {name: clinical, kind: dicomweb, url: "http://127.0.0.1:9/clinical", auth: none}
  - {name: research, kind: dicomweb, url: "http://127.0.0.1:9/research", auth: none}
matching: first
default: clinical
rules:
  - name: research-sender
    when: {PatientID: "RSCH*", calling_aet: RESEARCH_CT}
    to: [research]
  - name: ct
    when: {Modality: CT}
    to: [research, clinical]
"""


def test_reconcile_adopts_orphans_where_the_destinations_file_routes_them(
    cli: Cli, q: Queue, tmp_path: Path, data: Path
) -> None:
    """A row per destination the rules choose, said in the output; an orphan whose route
    hangs on the calling AE title (lost with the association) is kept, even by --fix."""
    from stowaway.db.part10 import dataset_offset, part10_header

    spool = Spool(data / "spool")
    spool.prepare()

    def orphan(seed: int, patient_id: str) -> tuple[str, str]:
        source = make_ct(tmp_path / f"{seed}.dcm", seed=seed, patient_id=patient_id)
        uids = read_uids(source)
        with source.open("rb") as f:
            f.seek(dataset_offset(f))
            header = part10_header(uids.sop_class_uid, uids.sop_uid, "1.2.840.10008.1.2.1")
            path = spool.write(header, f, utcnow()).relative_path
        age(data / "spool" / path, 2 * HOUR)
        return path, uids.sop_uid

    def rows_of(sop: str) -> list[QueuedInstance]:
        return [r for r in q.rows() if r.sop_instance_uid == sop]

    config = tmp_path / "destinations.yaml"
    config.write_text(ADOPT_DESTINATIONS)
    ct_path, ct_sop = orphan(20, "P1")
    research_path, research_sop = orphan(21, "RSCH7")

    text = cli("reconcile", "--adopt", "--destinations", str(config))
    assert text.returncode == 1, text.stdout + text.stderr  # one orphan remains
    ids = ", ".join(str(r.id) for r in rows_of(ct_sop))
    assert f"{ct_path}  " in text.stdout
    assert f"-> adopted as rows {ids} for research, clinical" in text.stdout
    assert "rule 'research-sender' tests calling_aet, which only the association knew" in (
        text.stdout
    )
    assert sorted(r.destination for r in rows_of(ct_sop)) == ["clinical", "research"]
    assert all(r.status == Status.PENDING and r.spool_path == ct_path for r in rows_of(ct_sop))

    later_path, later_sop = orphan(22, "P2")
    result = cli("reconcile", "--adopt", "--fix", "--destinations", str(config), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    by_path = {o["path"]: o for o in json.loads(result.stdout)["orphans"]}
    assert by_path[later_path]["destinations"] == ["research", "clinical"]
    assert sorted(by_path[later_path]["row_ids"]) == sorted(r.id for r in rows_of(later_sop))
    assert "tests calling_aet" in by_path[research_path]["action"]
    assert by_path[research_path]["destinations"] == []
    assert (data / "spool" / research_path).exists() and not rows_of(research_sop)


def test_operator_commands_while_the_receiver_runs(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    """stats, ls, requeue, reconcile and show run against a receiver taking a stream of
    instances: no lock-ups, nothing lost."""
    proc = stowaway("receive")
    files = make_study(tmp_path / "stream", 40, seed=11)
    sent: list[subprocess.CompletedProcess[str]] = []
    stop = threading.Event()

    def send() -> None:
        for f in files:  # one association per instance, until told to stop
            if stop.is_set():
                break
            sent.append(dcmsend(proc.port, [f]))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for command in (
            ("queue", "stats", "--json"),
            ("queue", "requeue", "--status", "pending", "--json"),
            ("reconcile", "--json"),
            ("queue", "purge", "--done", "--yes", "--json"),
        ):
            started = time.monotonic()
            result = proc.cli(*command, check=False)
            assert time.monotonic() - started < 30, command
            assert result.returncode == 0, (command, result.stdout, result.stderr)
    finally:
        stop.set()
        sender.join(120)
    assert sent and all(r.returncode == 0 for r in sent), [r.stderr for r in sent if r.returncode]
    rows = json.loads(proc.cli("queue", "ls", "--json", "--limit", "1000").stdout)
    assert len(rows) == len(sent) and {r["status"] for r in rows} == {"pending"}
    assert json.loads(proc.cli("reconcile", "--json").stdout)["problems"] == 0
    assert proc.stop() == 0
