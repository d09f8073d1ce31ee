"""The forwarder applies a destination's redaction and compression on the way out: the
destination gets the copy under its new UIDs, the row keeps the original's and records what
was sent, an instance that cannot be redacted is never sent, and one that cannot be
compressed goes uncompressed."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from stowaway.db.models import Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.forwarder.deidentify import RedactionSpec
from stowaway.forwarder.deidentify.uids import google_uid
from stowaway.forwarder.destinations import Outbound
from stowaway.forwarder.outbound import OutboundPipeline
from stowaway.forwarder.stow import StowClient
from stowaway.forwarder.transcode import TranscodeTarget
from stowaway.forwarder.worker import Forwarder, ForwarderConfig
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub
from tests.support.phi_instances import PHI_NAME, make_phi_ct

LEASE = timedelta(minutes=5)
CHC_GOOGLE = {"profile": "CHC_BASIC", "uid_scheme": "google"}


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
        transfer_syntax_uid=str(pydicom.dcmread(source).file_meta.TransferSyntaxUID),
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=stored.relative_path,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
    )


def forwarder(
    queue: Queue,
    spool: Spool,
    stub: HealthcareStub,
    outbound: Outbound,
    events: list[str],
    **config: object,
) -> Forwarder:
    pipeline = OutboundPipeline(
        outbound, spool.root / "outgoing", destination="research", needs_file=False,
        on_event=events.append,
    )  # fmt: skip
    settings = ForwarderConfig(
        "default",
        stub.base_url,
        keep_done=timedelta(hours=1),
        **config,  # type: ignore[arg-type]
    )
    return Forwarder(settings, queue, spool, lambda: StowClient(stub.base_url), outbound=pipeline)


def run(forwarder: Forwarder, queue: Queue, stub: HealthcareStub) -> None:
    """Forward until nothing is due (a claim takes one study's rows at a time)."""
    with StowClient(stub.base_url, connect_timeout=2, read_timeout=5) as client:
        while batch := queue.claim_batch("w", 10, LEASE):
            forwarder._forward("w", client, batch)


def test_a_redacted_copy_goes_under_its_new_uids_and_the_row_records_it(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    source = make_phi_ct(tmp_path / "phi.dcm")
    row_id = queue.enqueue(spooled(spool, source)).id
    events: list[str] = []
    outbound = Outbound(RedactionSpec.from_config(CHC_GOOGLE), None, "test")
    run(forwarder(queue, spool, stub, outbound, events), queue, stub)

    original = pydicom.dcmread(source)
    new_uid = google_uid(str(original.SOPInstanceUID))
    assert set(stub.stored) == {new_uid}
    copy = pydicom.dcmread(io.BytesIO(stub.stored[new_uid]))
    assert copy.PatientName == "" and copy.ReferencedSeriesSequence[0].PatientName == ""
    assert copy[0x00091001].value == f"private {PHI_NAME}"  # CHC_BASIC keeps private tags
    assert copy.PixelData == original.PixelData
    row = queue.get(row_id)
    assert row is not None and row.status == Status.DONE
    assert row.sop_instance_uid == original.SOPInstanceUID  # the row keeps the original's
    assert spool.verify(row.spool_path, row.size_bytes, row.sha256) is None  # unchanged
    applied = json.loads(row.applied or "")
    assert applied["redact"]["profile"] == "CHC_BASIC"
    assert applied["redact"]["sop_instance_uid"] == new_uid
    assert "(0010,0010)" in applied["redact"]["tags"]
    assert events == []
    assert not list((spool.root / "outgoing").iterdir())  # no scratch file left


def test_an_instance_that_cannot_be_redacted_is_failed_and_never_sent(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    source = make_ct(tmp_path / "deflated.dcm", 16, 16, patient_name=PHI_NAME)
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(source, enforce_file_format=True)
    good = make_phi_ct(tmp_path / "good.dcm", seed=4)
    bad_id = queue.enqueue(spooled(spool, source)).id
    good_id = queue.enqueue(spooled(spool, good)).id
    events: list[str] = []
    outbound = Outbound(RedactionSpec.from_config(CHC_GOOGLE), None, "test")
    run(forwarder(queue, spool, stub, outbound, events), queue, stub)

    bad = queue.get(bad_id)
    assert bad is not None and bad.status == Status.FAILED
    assert "cannot be redacted" in (bad.last_error or "")
    assert set(stub.stored) == {google_uid(read_uids(good).sop_uid)}  # the other one went
    assert str(read_uids(source).sop_uid) not in stub.stored
    assert google_uid(read_uids(source).sop_uid) not in stub.stored
    assert events == ["redaction_failed"]
    done = queue.get(good_id)
    assert done is not None and done.status == Status.DONE


def test_an_instance_that_cannot_be_compressed_goes_as_received_and_is_counted(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    packed = make_ct(tmp_path / "packed.dcm", 16, 16, seed=8)
    ds = pydicom.dcmread(packed)
    ds.compress(RLELossless)
    ds.save_as(packed, enforce_file_format=True)
    plain = make_ct(tmp_path / "plain.dcm", 32, 32, seed=9)  # OpenJPEG needs 32x32
    ids = [queue.enqueue(spooled(spool, p)).id for p in (packed, plain)]
    events: list[str] = []
    target = TranscodeTarget.from_config(str(JPEG2000Lossless))
    run(forwarder(queue, spool, stub, Outbound(None, target, "test"), events), queue, stub)

    assert stub.stored[read_uids(packed).sop_uid] == packed.read_bytes()  # as received
    compressed = pydicom.dcmread(io.BytesIO(stub.stored[read_uids(plain).sop_uid]))
    assert compressed.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert events == ["transcode_skipped"]
    records = [json.loads(queue.get(i).applied or "") for i in ids]  # type: ignore[union-attr]
    assert records[0]["transcode"]["applied"] is False
    assert "already compressed" in records[0]["transcode"]["reason"]
    assert records[1]["transcode"]["applied"] is True


def test_overwrite_deletes_the_destinations_copy_by_its_new_uids(
    queue: Queue, spool: Spool, stub: HealthcareStub, tmp_path: Path
) -> None:
    source = make_phi_ct(tmp_path / "phi.dcm")
    original = pydicom.dcmread(source)
    new_uid = google_uid(str(original.SOPInstanceUID))
    stub.stored[new_uid] = b"another instance under the same UID"  # -> 409
    queue.enqueue(spooled(spool, source))
    outbound = Outbound(RedactionSpec.from_config(CHC_GOOGLE), None, "test")
    fwd = forwarder(queue, spool, stub, outbound, [], overwrite_on_conflict=True)
    run(fwd, queue, stub)

    (delete,) = [r for r in stub.requests if r.method == "DELETE"]
    assert delete.path.endswith(
        f"/studies/{google_uid(str(original.StudyInstanceUID))}"
        f"/series/{google_uid(str(original.SeriesInstanceUID))}/instances/{new_uid}"
    )
    assert pydicom.dcmread(io.BytesIO(stub.stored[new_uid])).PatientName == ""


def test_a_redacted_body_starts_over_on_seek_zero(tmp_path: Path) -> None:
    """A request sent again (a 401 with refreshable credentials) re-reads its body."""
    from stowaway.forwarder.deidentify import Redactor

    redacted = Redactor(RedactionSpec.from_config(CHC_GOOGLE)).prepare(make_phi_ct(tmp_path / "p"))
    body = redacted.open()
    first = body.read()
    assert len(first) == redacted.size == len(body)  # type: ignore[arg-type]
    assert body.seek(0) == 0
    assert body.read() == first
    with pytest.raises(io.UnsupportedOperation):
        body.seek(10)
