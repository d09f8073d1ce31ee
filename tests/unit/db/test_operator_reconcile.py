"""reconcile's findings and repairs, and the start-up part."""

from __future__ import annotations

import io
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from stowaway.commands.reconcile import file_router
from stowaway.db.models import Status, utcnow
from stowaway.db.part10 import dataset_offset, part10_header
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.reconcile import REASON_PREFIX, run_reconcile, safe_startup_reconcile
from stowaway.db.spool import Spool
from stowaway.receiver.routing import (
    Condition,
    Equals,
    Matching,
    Not,
    RoutingTable,
    Rule,
    Subject,
    parse_subject,
)
from stowaway.runtime import State
from tests.support.dicom_files import make_ct, read_uids

LEASE = timedelta(minutes=5)
HOUR = 3600.0


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def spooled(
    spool: Spool, queue: Queue | None, n: int, data: bytes | None = None
) -> tuple[str, int]:
    """A spool file (and its pending row when ``queue``); returns (path, row id or 0)."""
    body = data if data is not None else f"instance {n}".encode() * 50
    written = spool.write(b"", io.BytesIO(body), utcnow())
    if queue is None:
        return written.relative_path, 0
    result = queue.enqueue(
        NewInstance(
            sop_instance_uid=f"1.2.3.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="MODALITY",
            peer_address="127.0.0.1:5000",
            spool_path=written.relative_path,
            size_bytes=written.size_bytes,
            sha256=written.sha256,
        )
    )
    return written.relative_path, result.id


def real_dicom_orphan(
    spool: Spool, tmp_path: Path, seed: int = 77, patient_id: str = "P1"
) -> tuple[str, str]:
    """A spool file written as the receiver would, but whose row was never committed."""
    source = make_ct(tmp_path / f"orphan-src-{seed}.dcm", seed=seed, patient_id=patient_id)
    uids = read_uids(source)
    with source.open("rb") as f:
        f.seek(dataset_offset(f))
        header = part10_header(uids.sop_class_uid, uids.sop_uid, "1.2.840.10008.1.2.1")
        written = spool.write(header, f, utcnow())
    return written.relative_path, uids.sop_uid


def state_of(queue: Queue, spool: Spool) -> State:
    return State(queue.engine, queue, spool)


def test_nothing_to_do_on_a_consistent_spool(queue: Queue, spool: Spool) -> None:
    spooled(spool, queue, 1)
    report = run_reconcile(
        state_of(queue, spool), node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=False
    )
    assert report.problems() == 0 and report.remaining() == 0


def test_crafted_crash_states_are_reported_then_fixed(queue: Queue, spool: Spool) -> None:
    state = state_of(queue, spool)
    orphan, _ = spooled(spool, None, 1)
    age(spool.root / orphan, 2 * HOUR)
    young_orphan, _ = spooled(spool, None, 2)
    missing_path, missing = spooled(spool, queue, 3)
    (spool.root / missing_path).unlink()
    corrupt_path, corrupt = spooled(spool, queue, 4)
    with (spool.root / corrupt_path).open("r+b") as f:
        f.seek(10)
        f.write(b"X")  # same size, different bytes
    _, expired = spooled(spool, queue, 5)
    _, healthy = spooled(spool, queue, 6)
    claimed = queue.claim_batch("crashed-forwarder", 1, timedelta(seconds=-1))
    assert [r.id for r in claimed] == [missing]  # oldest first; take the one we want too
    queue.release(missing, "crashed-forwarder")
    # lease the "expired" row only: claim everything due, give back all but it
    for row in queue.claim_batch("crashed-forwarder", 10, timedelta(seconds=-1)):
        if row.id != expired:
            queue.release(row.id, "crashed-forwarder")
    leftover = spool.incoming_dir / "partial.dcm"
    leftover.write_bytes(b"half")
    age(leftover, 2 * HOUR)
    fresh_leftover = spool.tmp_dir / "writing.part"
    fresh_leftover.write_bytes(b"now")

    report = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=False)
    assert [o.path for o in report.orphans] == [orphan]
    assert report.young_orphans == 1
    assert {b.row.id: b.reason for b in report.broken} == {
        missing: REASON_PREFIX + "spool file is missing",
        corrupt: REASON_PREFIX + "spool file checksum does not match the recorded one",
    }
    assert [e.row.id for e in report.expired] == [expired]
    assert report.leftovers == [leftover]
    assert report.remaining() == report.problems() == 5
    # report only: nothing changed
    assert (spool.root / orphan).exists() and leftover.exists()
    assert queue.get(missing).status == Status.PENDING  # type: ignore[union-attr]

    fixed = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=True, adopt_orphans=False)
    assert fixed.remaining() == 0
    assert not (spool.root / orphan).exists()
    assert (spool.root / young_orphan).exists()  # maybe a receipt committing right now
    assert not leftover.exists() and fresh_leftover.exists()
    for row_id in (missing, corrupt):
        row = queue.get(row_id)
        assert row is not None and row.status == Status.FAILED
        assert row.last_error is not None and row.last_error.startswith(REASON_PREFIX)
    row = queue.get(expired)
    assert row is not None and row.status == Status.PENDING and row.lease_owner is None
    assert queue.get(healthy).status == Status.PENDING  # type: ignore[union-attr]

    again = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=False)
    assert again.problems() == 0
    assert again.recorded_broken == 2  # failed, with the reason recorded: purge them


def test_adopt_turns_an_orphan_into_a_pending_row(
    queue: Queue, spool: Spool, tmp_path: Path
) -> None:
    path, sop = real_dicom_orphan(spool, tmp_path)
    age(spool.root / path, 2 * HOUR)
    report = run_reconcile(
        state_of(queue, spool), node_id="n1", grace_seconds=HOUR, delete=False, adopt_orphans=True
    )
    assert report.remaining() == 0
    assert report.orphans[0].action.startswith("adopted as row")
    [row] = queue.find_by_sop(sop)
    assert row.status == Status.PENDING and row.spool_path == path and row.node_id == "n1"
    assert spool.verify(row.spool_path, row.size_bytes, row.sha256) is None


def test_adopt_refuses_a_stale_copy_and_fix_deletes_it(
    queue: Queue, spool: Spool, tmp_path: Path
) -> None:
    path, sop = real_dicom_orphan(spool, tmp_path)
    age(spool.root / path, 2 * HOUR)
    # the sender re-sent after the crash: that copy is queued
    copy = spool.write(b"", io.BytesIO(b"the re-sent copy"), utcnow())
    queue.enqueue(
        NewInstance(
            sop,
            "1.2",
            "1.2.3",
            "1.2.3.0",
            "1.2.840.10008.1.2.1",
            "A",
            "p",
            copy.relative_path,
            copy.size_bytes,
            copy.sha256,
        )
    )
    junk, _ = spooled(spool, None, 9)
    age(spool.root / junk, 2 * HOUR)
    state = state_of(queue, spool)
    report = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=True)
    actions = {o.path: o.action for o in report.orphans}
    assert "already queued as row" in actions[path]
    assert actions[junk].startswith("not adopted: unreadable")
    assert report.remaining() == 2
    report = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=True, adopt_orphans=True)
    assert report.remaining() == 0
    assert not (spool.root / path).exists() and not (spool.root / junk).exists()
    assert len(queue.find_by_sop(sop)) == 1


def when(**conditions: str) -> tuple[Condition, ...]:
    return tuple(Condition(parse_subject(key), Equals(value)) for key, value in conditions.items())


def table(*rules: Rule, default: str | None = "archive") -> RoutingTable:
    names = frozenset({"clinical", "research", "archive"})
    return RoutingTable(rules, Matching.FIRST, default, names)


def test_an_adopted_orphan_is_queued_for_exactly_the_destinations_its_rules_choose(
    queue: Queue, spool: Spool, tmp_path: Path
) -> None:
    path, sop = real_dicom_orphan(spool, tmp_path)
    age(spool.root / path, 2 * HOUR)
    routing = table(
        Rule("mammography", when(Modality="MG"), ("archive",)),
        Rule("ct", when(Modality="CT"), ("research", "clinical")),
    )
    report = run_reconcile(
        state_of(queue, spool),
        node_id="",
        grace_seconds=HOUR,
        delete=False,
        adopt_orphans=True,
        route=file_router(routing),
    )
    rows = queue.find_by_sop(sop)
    assert sorted(r.destination for r in rows) == ["clinical", "research"]
    assert all(r.status == Status.PENDING and r.spool_path == path for r in rows)
    [orphan] = report.orphans
    assert orphan.fixed and orphan.destinations == ("research", "clinical")
    assert sorted(orphan.row_ids) == sorted(r.id for r in rows)
    assert orphan.action.endswith("for research, clinical")


def test_adoption_without_routing_rules_queues_for_the_default_destination(
    queue: Queue, spool: Spool, tmp_path: Path
) -> None:
    path, sop = real_dicom_orphan(spool, tmp_path)
    age(spool.root / path, 2 * HOUR)
    run_reconcile(
        state_of(queue, spool), node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=True
    )
    assert [r.destination for r in queue.find_by_sop(sop)] == ["default"]


@pytest.mark.parametrize(
    "matcher",
    [Equals("RESEARCH_CT"), Not(Equals("TEST"))],
    ids=["calling-aet-equals", "calling-aet-not"],
)
def test_an_orphan_whose_route_needs_the_calling_aet_is_kept_not_guessed(
    queue: Queue, spool: Spool, tmp_path: Path, matcher: Equals | Not
) -> None:
    """The calling AE title died with the association: a rule on it that could decide is
    not evaluated on a blank (a `not` would match it), and --fix keeps the file."""
    needs_aet, needs_sop = real_dicom_orphan(spool, tmp_path, seed=1, patient_id="RSCH7")
    decided, decided_sop = real_dicom_orphan(spool, tmp_path, seed=2, patient_id="P1")
    for path in (needs_aet, decided):
        age(spool.root / path, 2 * HOUR)
    research = Rule(
        "research-sender",
        (*when(PatientID="RSCH7"), Condition(Subject.CALLING_AET, matcher)),
        ("research",),
    )
    routing = table(research, Rule("ct", when(Modality="CT"), ("clinical",)))
    report = run_reconcile(
        state_of(queue, spool),
        node_id="",
        grace_seconds=HOUR,
        delete=True,
        adopt_orphans=True,
        route=file_router(routing),
    )
    actions = {o.path: o for o in report.orphans}
    assert actions[needs_aet].action.startswith(
        "not adopted: rule 'research-sender' tests calling_aet"
    )
    assert not actions[needs_aet].fixed and (spool.root / needs_aet).exists()
    assert queue.find_by_sop(needs_sop) == []
    # a rule on the calling AE title whose data set conditions fail decides nothing
    assert [r.destination for r in queue.find_by_sop(decided_sop)] == ["clinical"]
    assert report.remaining() == 1


def test_an_unrouted_copy_makes_an_orphan_stale(queue: Queue, spool: Spool, tmp_path: Path) -> None:
    """The sender re-sent it and no rule matched: adopting the orphan would duplicate it."""
    path, sop = real_dicom_orphan(spool, tmp_path)
    age(spool.root / path, 2 * HOUR)
    copy = spool.write(b"", io.BytesIO(b"the re-sent copy"), utcnow())
    [unrouted] = queue.enqueue(
        NewInstance(
            sop,
            "1.2",
            "1.2.3",
            "1.2.3.0",
            "1.2.840.10008.1.2.1",
            "A",
            "p",
            copy.relative_path,
            copy.size_bytes,
            copy.sha256,
            destinations=(),
        )
    ).ids
    report = run_reconcile(
        state_of(queue, spool), node_id="", grace_seconds=HOUR, delete=False, adopt_orphans=True
    )
    assert report.orphans[0].action == f"not adopted: already queued as row {unrouted} (unrouted)"
    assert [r.id for r in queue.find_by_sop(sop)] == [unrouted]


def test_other_nodes_rows_are_not_checked_against_this_spool(queue: Queue, spool: Spool) -> None:
    queue.enqueue(
        NewInstance("9.9", "1.2", "1.2.3", "1.2.3.0", "1.2.1", "A", "p", "2026/x.dcm", 1, "0", "b")
    )
    report = run_reconcile(
        state_of(queue, spool), node_id="a", grace_seconds=HOUR, delete=True, adopt_orphans=False
    )
    assert report.problems() == 0
    assert queue.find_by_sop("9.9")[0].status == Status.PENDING


def test_safe_startup_reconcile_only_clears_partial_receipts_and_counts(
    queue: Queue, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    orphan, _ = spooled(spool, None, 1)
    age(spool.root / orphan, 2 * HOUR)
    missing_path, missing = spooled(spool, queue, 2)
    (spool.root / missing_path).unlink()
    (spool.incoming_dir / "a").write_bytes(b"x")
    (spool.tmp_dir / "b.part").write_bytes(b"y")  # young: start-up clears it anyway
    with caplog.at_level(logging.INFO, logger="stowaway"):
        summary = safe_startup_reconcile(state_of(queue, spool))
    assert (summary.leftovers_removed, summary.orphans, summary.missing_files) == (2, 1, 1)
    assert not list(spool.incoming_dir.iterdir()) and not list(spool.tmp_dir.iterdir())
    assert (spool.root / orphan).exists()  # counted, not deleted
    assert queue.get(missing).status == Status.PENDING  # type: ignore[union-attr]
    [record] = [r for r in caplog.records if r.getMessage() == "startup_reconcile"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["orphan_files"] == 1


def test_an_empty_spool_looks_unmounted_and_rows_are_not_failed(queue: Queue, spool: Spool) -> None:
    paths = [spooled(spool, queue, n) for n in (1, 2)]
    for path, _ in paths:
        (spool.root / path).unlink()  # as if the volume were not mounted
    state = state_of(queue, spool)
    report = run_reconcile(state, node_id="", grace_seconds=HOUR, delete=True, adopt_orphans=False)
    assert report.remaining() == 2
    assert all("volume not mounted?" in b.action for b in report.broken)
    assert {r.status for r in queue.rows()} == {Status.PENDING}
    report = run_reconcile(
        state,
        node_id="",
        grace_seconds=HOUR,
        delete=True,
        adopt_orphans=False,
        empty_spool_ok=True,
    )
    assert report.remaining() == 0
    assert {r.status for r in queue.rows()} == {Status.FAILED}
