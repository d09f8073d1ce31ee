"""Put instances straight into a queue and spool, as the receiver would."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stowaway.db.engine import make_engine
from stowaway.db.models import utcnow
from stowaway.db.part10 import dataset_offset, part10_header
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from tests.support.dicom_files import read_uids


def seed_queue(db_url: str, data_dir: Path, files: Sequence[Path], node_id: str = "") -> list[int]:
    """Spool ``files`` under ``data_dir/spool`` and enqueue them; returns the row ids."""
    spool = Spool(data_dir / "spool")
    spool.prepare()
    engine = make_engine(db_url)
    queue = Queue(engine)
    ids = []
    try:
        for path in files:
            uids = read_uids(path)
            with path.open("rb") as source:
                source.seek(dataset_offset(source))
                header = part10_header(uids.sop_class_uid, uids.sop_uid, "1.2.840.10008.1.2.1")
                spooled = spool.write(header, source, utcnow())
            result = queue.enqueue(
                NewInstance(
                    sop_instance_uid=uids.sop_uid,
                    sop_class_uid=uids.sop_class_uid,
                    study_instance_uid=uids.study_uid,
                    series_instance_uid=uids.series_uid,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_aet="SEED",
                    peer_address="127.0.0.1:0",
                    spool_path=spooled.relative_path,
                    size_bytes=spooled.size_bytes,
                    sha256=spooled.sha256,
                    node_id=node_id,
                )
            )
            ids.append(result.id)
    finally:
        engine.dispose()
    return ids


def wait_until(
    predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s: {predicate}")


def spooled_instance(
    spool: Spool,
    sop_instance_uid: str,
    content: bytes = b"instance",
    *,
    size_bytes: int | None = None,
    destinations: tuple[str, ...] = ("default",),
) -> NewInstance:
    """A file written to ``spool`` and the row the receiver would record for it (one CT
    study, ``1.2.3``); ``size_bytes`` records another size than the file's."""
    stored = spool.write(b"", io.BytesIO(content), utcnow())
    return NewInstance(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=stored.relative_path,
        size_bytes=stored.size_bytes if size_bytes is None else size_bytes,
        sha256=stored.sha256,
        destinations=destinations,
    )
