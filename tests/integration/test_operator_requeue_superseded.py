"""``queue requeue --status done --study X`` never sends an older copy of an instance again.

The newer copy was forwarded (its file deleted after the upload); the older copy,
superseded, still has its file. Requeueing the study's done rows must close the
older copy again instead of making it pending (a forwarder then uploaded the OLD
version over the new one). On SQLite and Postgres, through the real CLI.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from stowaway.db.engine import make_engine
from stowaway.db.models import Status, utcnow
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from tests.support.dicom_files import make_ct
from tests.support.processes import run_cli
from tests.support.seeding import seed_queue

LEASE = timedelta(minutes=5)


def test_requeue_of_a_studys_done_rows_leaves_the_superseded_older_copy_closed(
    tmp_path: Path, db_url: str
) -> None:
    data = tmp_path / "data"
    old_file = make_ct(tmp_path / "old.dcm", seed=8, patient_name="Old^Version")
    new_file = make_ct(tmp_path / "new.dcm", seed=8, patient_name="New^Version")
    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        [old] = seed_queue(db_url, data, [old_file])
        assert [r.id for r in queue.claim_batch("w-old", 1, LEASE)] == [old]
        [new] = seed_queue(db_url, data, [new_file])  # re-sent while the old one uploads
        queue.retry(old, "w-old", "HTTP 503", utcnow())  # closed as superseded
        older = queue.get(old)
        assert older is not None and older.status == Status.DONE
        assert [r.id for r in queue.claim_batch("w-new", 1, LEASE)] == [new]
        queue.complete(new, "w-new")
        newer = queue.get(new)
        assert newer is not None
        Spool(data / "spool").remove(newer.spool_path)  # as the forwarder does

        result = run_cli(
            "queue",
            "requeue",
            "--status",
            "done",
            "--study",
            older.study_instance_uid,
            "--json",
            "--data-dir",
            str(data),
            "--db-url",
            db_url,
        )
        report = json.loads(result.stdout)
        assert report["requeued"] == 0
        assert report["superseded"] == [old]
        assert report["file_gone"] == [new]
        assert queue.rows(status=Status.PENDING) == []
        assert queue.claim_batch("w", 10, LEASE) == []
    finally:
        queue.close()
        engine.dispose()
