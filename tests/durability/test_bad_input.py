"""Bad input never produces a Success for something not stored, nor leaves debris.

Datasets that are not DICOM, a P-DATA stream cut in the middle of a dataset
(A-ABORT, or a TCP reset), SOP classes that are not storage, AE titles that
do not match or are not allowed, and UIDs crafted to escape the spool. After
each, the receiver still stores a good instance, no row exists for what was
refused, no partial file stays in ``incoming/`` or ``tmp/``, and the invariant
holds for what was acknowledged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.config import settings as pydicom_settings
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    SUCCESS,
    Corpus,
    Ledger,
    NoDestination,
    Scenario,
    end,
    new_ae,
    nodelay,
    partial_files,
    queue_rows,
    send_file,
    spool_files,
    wire_digest,
    write_part10,
)
from tests.support.processes import StowawayProcess
from tests.support.seeding import wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::ResourceWarning")]

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.10.1207.1.1"


@pytest.fixture
def db_url(sqlite_db_url: str) -> str:
    # What the receiver makes of its input does not depend on the queue database.
    return sqlite_db_url


def spool_dir(proc: StowawayProcess) -> Path:
    return proc.data_dir / "spool"


def store(port: int, ds: Dataset, ledger: Ledger, calling_aet: str = "GOOD") -> int | None:
    """One instance on its own association, recorded in the ledger."""
    ae = new_ae(calling_aet, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)])
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="IMPORTADAPTER")
        if not assoc.is_established:
            return None
        nodelay(assoc)
        ledger.record_sent(str(ds.SOPInstanceUID), wire_digest(ds))
        response = assoc.send_c_store(ds)
        status = int(response.Status) if "Status" in response else None
        ledger.record_status(str(ds.SOPInstanceUID), status)
        assoc.release()
        return status
    finally:
        ae.shutdown()


def still_receiving(proc: StowawayProcess, ledger: Ledger, tag: str) -> None:
    """The receiver is alive and stores a good instance."""
    assert store(proc.port, Corpus(tag, 1).dataset(0), ledger) == SUCCESS


def finish(
    proc: StowawayProcess,
    ledger: Ledger,
    db_url: str,
    record_property: object,
    name: str,
    **extra: object,
) -> None:
    end(proc)
    run = Scenario(
        name,
        ledger,
        record_property,  # type: ignore[arg-type]
        db_url=db_url,
        spool_dir=spool_dir(proc),
        seed=0,  # no randomness: each input is crafted
    )
    report = run.check(NoDestination(), **extra)
    assert report.waiting_pending == report.acknowledged
    assert {r.sop_instance_uid for r in queue_rows(db_url)} == ledger.acked
    assert len(spool_files(spool_dir(proc))) == report.acknowledged
    assert partial_files(spool_dir(proc)) == []


def test_datasets_that_are_not_dicom(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    proc = stowaway("receive")
    corpus = Corpus("not-dicom", 4)
    still_receiving(proc, ledger, "not-dicom-first")

    def bad(name: str, uid: str, body: bytes) -> int | None:
        path = tmp_path / f"{name}.dcm"
        write_part10(path, CTImageStorage, uid, [body])
        return send_file(proc.port, path, context=(CTImageStorage, ExplicitVRLittleEndian))

    statuses = {
        "garbage": bad("garbage", corpus.uid(0), bytes(range(256)) * 40),
        "empty": bad("empty", corpus.uid(1), b""),
        "truncated element header": bad("truncated", corpus.uid(2), b"\x08\x00\x18\x00UI\x40"),
    }
    no_study = corpus.dataset(3)
    del no_study.StudyInstanceUID
    statuses["no StudyInstanceUID"] = bad("nostudy", corpus.uid(3), encode(no_study, False, True))
    for what, status in statuses.items():
        assert status is not None, f"{what}: association aborted instead of answered"
        assert status & 0xF000 in (0xA000, 0xC000), f"{what}: answered 0x{status:04X}"
    # The dataset's own SOP Instance UID is the instance's identity, not the command's.
    real = Corpus("not-dicom-mismatch", 1).dataset(0)
    path = tmp_path / "mismatch.dcm"
    digest = write_part10(path, CTImageStorage, "1.2.3.999", [encode(real, False, True)])
    status = send_file(proc.port, path, context=(CTImageStorage, ExplicitVRLittleEndian))
    ledger.record_expected(str(real.SOPInstanceUID), digest, acked=status == SUCCESS)
    still_receiving(proc, ledger, "not-dicom-last")
    finish(proc, ledger, db_url, record_property, "bad-input-not-dicom", refused=len(statuses))


A_ABORT_PDU = b"\x07\x00" + struct.pack(">I", 4) + b"\x00\x00\x00\x00"


def send_partial_c_store(
    port: int, dataset_prefix: bytes, uid: str, cut_after: int, cut: str
) -> None:
    """Negotiate with pynetdicom, then write the C-STORE's P-DATA PDUs ourselves and
    stop after ``cut_after`` bytes: with an A-ABORT PDU, or a TCP reset."""
    ae = new_ae("CUTTER")
    assoc = ae.associate("127.0.0.1", port, ae_title="IMPORTADAPTER")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = uid
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset_prefix)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    sent = 0
    for primitive in message.encode_msg(context_id, assoc.acceptor.maximum_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        data = pdu.encode()
        raw.sendall(data)
        sent += len(data)
        if sent >= cut_after:
            break
    if cut == "a-abort":
        raw.sendall(A_ABORT_PDU)
    else:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        raw.close()
    wait_until(lambda: not assoc.is_alive(), timeout=10)
    ae.shutdown()


@pytest.mark.parametrize("cut", ["a-abort", "tcp-reset"])
def test_pdata_stream_cut_mid_dataset(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    record_property: object,
    cut: str,
) -> None:
    proc = stowaway("receive")
    ds = Corpus("cut", 1).dataset(0)
    del ds.PixelData
    ds.Rows, ds.Columns = 4096, 8192  # 64 MiB of pixels announced, 6 MiB sent
    prefix = encode(ds, False, True) + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 64 << 20)
    prefix += bytes(range(256)) * (6 << 12)
    send_partial_c_store(proc.port, prefix, str(ds.SOPInstanceUID), 4 << 20, cut)
    # The partial receipt is removed at once (not left to fill the disk until a restart).
    wait_until(lambda: partial_files(spool_dir(proc)) == [], timeout=10)
    assert queue_rows(db_url) == []
    still_receiving(proc, ledger, f"cut-{cut}")
    finish(proc, ledger, db_url, record_property, f"bad-input-cut-{cut}")


def test_sop_classes_that_are_not_storage(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    record_property: object,
) -> None:
    proc = stowaway("receive")
    find = str(StudyRootQueryRetrieveInformationModelFind)

    # Only a query model proposed: nothing to accept.
    ae = new_ae("FINDER", [(find, ExplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
    assert not any(cx.abstract_syntax == find for cx in assoc.accepted_contexts)
    if assoc.is_established:
        assoc.release()

    # A query model next to a storage class: the storage context only.
    ae = new_ae("MIXED", [(find, ExplicitVRLittleEndian), (CTImageStorage, ExplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [find]
    ds = Corpus("mixed", 1).dataset(0)
    ledger.record_sent(str(ds.SOPInstanceUID), wire_digest(ds))
    response = assoc.send_c_store(ds)
    ledger.record_status(str(ds.SOPInstanceUID), int(response.Status))
    assoc.release()

    # A private SOP class is storage as far as a gateway knows: stored as is.
    private = Corpus("private", 1).dataset(0)
    private.SOPClassUID = PRIVATE_SOP_CLASS
    assert store(proc.port, private, ledger) == SUCCESS

    # A C-FIND on a context accepted as storage is answered or aborted, never crashes.
    ae = new_ae("FINDER", [(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    with contextlib.suppress(Exception):
        for _status, _identifier in assoc.send_c_find(query, PRIVATE_SOP_CLASS):
            pass
    if assoc.is_established:
        assoc.release()

    still_receiving(proc, ledger, "not-storage-last")
    rows = {r.sop_instance_uid: r for r in queue_rows(db_url)}
    assert rows[str(private.SOPInstanceUID)].sop_class_uid == PRIVATE_SOP_CLASS
    finish(proc, ledger, db_url, record_property, "bad-input-not-storage")


def test_ae_titles_that_do_not_match_or_are_not_allowed(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    record_property: object,
) -> None:
    proc = stowaway("receive", "--allowed-calling-aets", "PACS1,PACS2")
    corpus = Corpus("aets", 3)
    attempts = {
        ("PACS1", "SOMEONEELSE"): corpus.dataset(0),  # wrong called AE title
        ("INTRUDER", "IMPORTADAPTER"): corpus.dataset(1),  # calling AE not allowed
        ("PACS2", "IMPORTADAPTER"): corpus.dataset(2),  # allowed
    }
    outcomes = {}
    for (calling, called), ds in attempts.items():
        ae = new_ae(calling)
        assoc = ae.associate("127.0.0.1", proc.port, ae_title=called)
        outcomes[(calling, called)] = assoc.is_established
        if assoc.is_established:
            ledger.record_sent(str(ds.SOPInstanceUID), wire_digest(ds))
            response = assoc.send_c_store(ds)
            ledger.record_status(str(ds.SOPInstanceUID), int(response.Status))
            assoc.release()
        else:
            assert assoc.is_rejected
        ae.shutdown()
    assert outcomes == {
        ("PACS1", "SOMEONEELSE"): False,
        ("INTRUDER", "IMPORTADAPTER"): False,
        ("PACS2", "IMPORTADAPTER"): True,
    }
    assert ledger.acked == {str(corpus.dataset(2).SOPInstanceUID)}
    assert proc.log().count("association_rejected") == 2
    finish(proc, ledger, db_url, record_property, "bad-input-ae-titles")


def test_crafted_uids_stay_inside_the_spool(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    tmp_path: Path,
    record_property: object,
) -> None:
    proc = stowaway("receive")
    marker = f"escaped{int(time.time())}"
    crafted = {
        "sop": f"../../../../../{marker}",
        "sop-absolute": f"/tmp/{marker}",
        "study": "../../../..",
        "series": f"..\\..\\{marker}",
        "sop-dots": "..",
    }
    original = pydicom_settings.writing_validation_mode
    pydicom_settings.writing_validation_mode = pydicom.config.IGNORE  # bad UIDs on purpose
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, (field, value) in enumerate(crafted.items()):
                ds = Corpus(f"crafted-{k}", 1).dataset(0)
                if field.startswith("sop"):
                    ds.SOPInstanceUID = value
                elif field == "study":
                    ds.StudyInstanceUID = value
                else:
                    ds.SeriesInstanceUID = value
                status = store(proc.port, ds, ledger, calling_aet="CRAFTER")
                assert status is not None
            # A UID of more than 64 characters is refused, not truncated.
            long = Corpus("crafted-long", 1).dataset(0)
            long.SOPInstanceUID = "1." + "2" * 70
            path = tmp_path / "long.dcm"
            write_part10(path, CTImageStorage, "1.2.3.4", [encode(long, False, True)])
            status = send_file(proc.port, path, context=(CTImageStorage, ExplicitVRLittleEndian))
            assert status is not None and status != SUCCESS
    finally:
        pydicom_settings.writing_validation_mode = original
    root = spool_dir(proc).resolve()
    for path in spool_files(spool_dir(proc)):
        assert path.resolve().is_relative_to(root)
    assert not list(tmp_path.parent.rglob(f"*{marker}*"))
    assert not list(Path("/tmp").glob(f"{marker}*"))
    for row in queue_rows(db_url):
        assert (root / row.spool_path).resolve().is_relative_to(root)
        assert ".." not in row.spool_path
    still_receiving(proc, ledger, "crafted-last")
    finish(proc, ledger, db_url, record_property, "bad-input-crafted-uids")
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in spool_files(spool_dir(proc))}
    assert len(digests) == len(ledger.acked)
