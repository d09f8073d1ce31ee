"""An operator requeues failed rows once the destination is fixed: they end up stored.

Runs `stowaway forward` against the Healthcare API stub and the operator CLI against the
same queue, on SQLite and Postgres.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.models import Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_study, read_uids
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.seeding import seed_queue, wait_until

pytestmark = pytest.mark.timeout(180)

FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "1s")
IAM_403 = (
    "the service account lacks roles/healthcare.dicomEditor on the DICOM store: grant it "
    "[Http_403, PERMISSION_DENIED, Permission 'healthcare.dicomStores.d]"
)


def test_requeue_of_failed_rows_after_the_destination_turns_from_403_to_200(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str
) -> None:
    files = make_study(tmp_path / "study", 5, seed=21)
    ids = seed_queue(db_url, tmp_path / "data", files)
    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        # Rows that failed while the store refused them (the error is what the
        # forwarder records for a 403).
        for row in queue.claim_batch("earlier-run", 10, timedelta(minutes=5)):
            queue.fail(row.id, "earlier-run", f"HTTP 403: {IAM_403}")
        assert [r.status for r in queue.rows()] == [Status.FAILED] * 5
        with HealthcareStub() as stub:
            stub.script(Fault.iam_denied(times=2))  # still refused for a little while
            proc = stowaway("forward", "--dicomweb-url", stub.base_url, "--auth", "none", *FAST)
            wait_until(lambda: "starting" in proc.log(), timeout=30)
            time.sleep(0.5)
            # failed rows wait for the operator: the forwarder leaves them alone
            assert not [r for r in stub.requests if r.method == "POST"]

            result = proc.cli("queue", "requeue", "--failed")
            assert result.stdout.strip() == "requeued 5 row(s)"
            # 403 first (destination blocked, nothing burnt), then 200: all stored.
            wait_until(lambda: all(r.status == Status.DONE for r in queue.rows()), timeout=90)
            assert set(stub.stored) == {read_uids(f).sop_uid for f in files}
            assert stub.pending_faults() == 0
            stats = json.loads(proc.cli("queue", "stats", "--json").stdout)
            assert stats["done"] == 5 and stats["failed"] == 0
            assert stats["last_hour"]["uploaded"] == 5
            [dest] = stats["destinations"]
            assert dest["url"] == stub.base_url and dest["state"] == "ok"
            assert proc.stop() == 0
        for row_id in ids:
            row = queue.get(row_id)
            assert row is not None and row.status == Status.DONE and row.last_error is None
            kinds = [kind for _at, kind, _d in queue.events(row_id)]
            assert kinds[:2] == ["failed", "requeued"]
            assert queue.events(row_id)[1][2] == f"HTTP 403: {IAM_403}"  # kept in history
        assert "destination_blocked" in proc.log()
        assert not list((tmp_path / "data" / "spool").glob("[0-9]*/*/*/*/*.dcm"))
    finally:
        engine.dispose()
