"""``stowaway forward`` retires done rows older than ``--retain-done`` by itself.

A real process on a real queue (SQLite and Postgres): done rows aged past the
window go without any command, with their leftover spool files; recent done
rows and failed rows stay; ``/metrics`` counts what was retired and still
matches the table; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import io
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from stowaway.db.engine import make_engine
from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from tests.conftest import StowawayFactory
from tests.support.processes import free_port
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(120)
LEASE = timedelta(minutes=5)


def test_forward_retires_old_done_rows_by_itself(
    stowaway: StowawayFactory, db_url: str, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "data" / "spool")
    spool.prepare()
    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        ids = []
        for n in range(30):
            stored = spool.write(b"", io.BytesIO(f"instance {n}".encode()), utcnow())
            ids.append(
                queue.enqueue(
                    NewInstance(
                        sop_instance_uid=f"1.2.3.{n}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        study_instance_uid="1.2.3",
                        series_instance_uid="1.2.3.0",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        calling_aet="MODALITY",
                        peer_address="127.0.0.1:5000",
                        spool_path=stored.relative_path,
                        size_bytes=stored.size_bytes,
                        sha256=stored.sha256,
                    )
                ).id
            )
        claimed = queue.claim_batch("w", 30, LEASE)
        queue.complete_many([r.id for r in claimed[:25]], "w")  # files left, as after a crash
        for row in claimed[25:]:
            queue.fail(row.id, "w", "HTTP 400")
        old, recent = ids[:20], ids[20:25]
        with engine.begin() as conn:
            conn.execute(
                update(Instance)
                .where(Instance.id.in_(old + ids[25:]))
                .values(forwarded_at=utcnow() - timedelta(days=2))
            )
        old_files = [spool.absolute(r.spool_path) for r in claimed[:20]]
        assert all(f.exists() for f in old_files)

        # Nothing listens there: forwarding has nothing to do; retention runs anyway.
        proc = stowaway(
            "forward",
            "--dicomweb-url",
            f"http://127.0.0.1:{free_port()}/dicom-web",
            "--auth",
            "none",
            "--retain-done",
            "1d",
        )
        wait_until(lambda: "retention_pass" in proc.log(), timeout=30)
        assert [queue.get(i) for i in old] == [None] * 20
        assert all(queue.get(i) is not None for i in recent)
        assert [r.status for r in queue.rows(status=Status.FAILED)] == [Status.FAILED] * 5
        assert not any(f.exists() for f in old_files)
        assert queue.maintained_counts() == queue.full_counts()
        url = f"http://127.0.0.1:{proc.http_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "stowaway_queue_retired_total 20.0" in metrics
        assert 'stowaway_queue_instances{status="done"} 5.0' in metrics
        assert "retention_pass" in proc.log()
        assert proc.stop() == 0
    finally:
        queue.close()
        engine.dispose()
