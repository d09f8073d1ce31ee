"""``--on-conflict overwrite`` never replaces a newer copy at the destination with an older one."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from stowaway.db.models import Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.forwarder.stow import StowClient
from stowaway.forwarder.worker import Forwarder, ForwarderConfig
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub

LEASE = timedelta(minutes=5)


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def spooled(spool: Spool, source: Path) -> NewInstance:
    uids = read_uids(source)
    stored = spool.write(b"", io.BytesIO(source.read_bytes()), utcnow())
    return NewInstance(
        sop_instance_uid=uids.sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=uids.study_uid,
        series_instance_uid=uids.series_uid,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=stored.relative_path,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
    )


def test_overwrite_of_an_older_copy_supersedes_it_instead_of_deleting_the_newer(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    old_file = make_ct(tmp_path / "old.dcm", seed=3, patient_name="Old^Version")
    new_file = make_ct(tmp_path / "new.dcm", seed=3, patient_name="New^Version")
    old = queue.enqueue(spooled(spool, old_file)).id
    [old_row] = queue.claim_batch("w-old", 1, LEASE)  # its upload is slow...
    queue.enqueue(spooled(spool, new_file))  # ...the sender sends a corrected version
    [new_row] = queue.claim_batch("w-new", 1, LEASE)
    config = ForwarderConfig(stub.base_url, overwrite_on_conflict=True)
    forwarder = Forwarder(config, queue, spool, lambda: StowClient(stub.base_url))
    with StowClient(stub.base_url, connect_timeout=2, read_timeout=2) as client:
        forwarder._forward("w-new", client, [new_row])  # the newer copy arrives first
        assert stub.stored[new_row.sop_instance_uid] == new_file.read_bytes()
        forwarder._forward("w-old", client, [old_row])  # then the older one: 409
    assert stub.stored[new_row.sop_instance_uid] == new_file.read_bytes()
    assert not [r for r in stub.requests if r.method == "DELETE"]
    row = queue.get(old)
    assert row is not None and row.status == Status.DONE
    assert f"row {new_row.id}" in (row.last_error or "")
