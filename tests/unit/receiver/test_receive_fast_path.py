"""The receive fast path: hand-encoded file meta, the UID scan, streamed incoming files,
group commit and batched completion, each checked against the slow, obvious way."""

from __future__ import annotations

import hashlib
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from stowaway.db.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    part10_header,
    read_header_uids,
    scan_header_uids,
)
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.receiver import incoming
from stowaway.receiver.group_commit import GroupCommit
from tests.support.dicom_files import dataset_bytes, make_ct

CT = "1.2.840.10008.5.1.4.1.1.2"


def pydicom_header(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    "uids",
    [
        (CT, "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2"),
        ("1.2", "1.2.840.113619.2.55.3.604688119.969.1268071029.320.1", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_hand_encoded_file_meta_is_byte_identical_to_pydicoms(uids: tuple[str, str, str]) -> None:
    assert part10_header(*uids) == pydicom_header(*uids)


def encoded(ds: Dataset, implicit: bool) -> bytes:
    """The dataset alone (no file meta), as a sender puts it on the wire."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def sample_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    item = Dataset()
    item.CodeValue = "X"
    item.ReferencedSOPInstanceUID = "9.9.9"  # a nested UID must not be taken
    ds.ProcedureCodeSequence = Sequence([item, Dataset()])
    ds.PatientName = "A^B"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Rows = 2
    ds.BitsAllocated = 8
    ds.PixelData = b"\x00" * 8
    return ds


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined_lengths", [False, True])
def test_uid_scan_agrees_with_pydicom(implicit: bool, undefined_lengths: bool) -> None:
    ds = sample_dataset()
    if undefined_lengths:
        ds["ProcedureCodeSequence"].is_undefined_length = True
        for item in ds.ProcedureCodeSequence:
            item.is_undefined_length_sequence_item = True
    data = encoded(ds, implicit)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    assert scan_header_uids(data, syntax) == {
        "SOPClassUID": CT,
        "SOPInstanceUID": "1.2.3.4.5",
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
    }


def test_uid_scan_gives_up_rather_than_guess(tmp_path: Path) -> None:
    data = encoded(sample_dataset(), implicit=False)
    assert scan_header_uids(data[:40], ExplicitVRLittleEndian) is None  # truncated head
    assert scan_header_uids(data, "1.2.840.10008.1.2.2") is None  # big endian: pydicom's job
    missing = sample_dataset()
    del missing.StudyInstanceUID
    assert scan_header_uids(encoded(missing, False), ExplicitVRLittleEndian) is None
    # ...and the file is then read with pydicom, which gives the same answer.
    path = make_ct(tmp_path / "ct.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.9")
    head = dataset_bytes(path.read_bytes())[:40]
    assert read_header_uids(path, head, ExplicitVRLittleEndian) == read_header_uids(path)


def pynetdicom_like_writes(f: incoming.IncomingFile, part10: bytes, pdv: int = 1000) -> None:
    """What pynetdicom's chunked receive does: preamble, DICM, meta, then PDVs."""
    meta_end = 144 + int.from_bytes(part10[140:144], "little")
    f.write(b"\x00" * 128)
    f.write(b"DICM")
    f.write(part10[132:meta_end])
    for i in range(meta_end, len(part10), pdv):
        f.write(part10[i : i + pdv])
        f.file.flush()


def test_incoming_file_becomes_the_spool_file(tmp_path: Path) -> None:
    source = make_ct(tmp_path / "ct.dcm", rows=128, cols=128)  # a dataset of several PDVs
    ds = pydicom.dcmread(source)
    f = incoming.IncomingFile(str(tmp_path))
    assert incoming.lookup(f.name) is f
    pynetdicom_like_writes(f, source.read_bytes())
    received = f.finish()
    f.sync()
    f.close()
    expected = part10_header(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian) + dataset_bytes(
        source.read_bytes()
    )
    written = Path(received.path).read_bytes()
    assert written == expected
    assert received.size_bytes == len(expected)
    assert received.sha256 == hashlib.sha256(expected).hexdigest()
    assert received.deterministic
    assert (received.sop_class_uid, received.sop_instance_uid) == (CT, ds.SOPInstanceUID)
    assert received.head == dataset_bytes(source.read_bytes())
    f.close()  # pynetdicom closes again after the handler: harmless


def test_incoming_file_writes_while_the_dataset_arrives(tmp_path: Path) -> None:
    # Hashing and writing happen as PDVs come in, not in the handler the sender waits for.
    source = make_ct(tmp_path / "ct.dcm", rows=512, cols=512)  # about 0.5 MB
    data = source.read_bytes()
    f = incoming.IncomingFile(str(tmp_path))
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    pynetdicom_like_writes(f, data[: len(data) // 2])
    on_disk = Path(f.name).stat().st_size
    assert on_disk >= incoming.WRITE_CHUNK
    assert on_disk <= len(data) // 2 + 1024  # what arrived so far (our meta is a few bytes longer)
    for i in range(len(data) // 2, len(data), 1000):
        f.write(data[i : i + 1000])
    received = f.finish()
    f.sync()
    f.close()
    assert Path(received.path).read_bytes()[received.header_length :] == data[meta_end:]
    assert received.sha256 == hashlib.sha256(Path(received.path).read_bytes()).hexdigest()


def test_incoming_file_reports_write_errors_in_the_handler(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    f = incoming.IncomingFile(str(not_a_directory))  # cannot be created: no raise here...
    pynetdicom_like_writes(f, make_ct(tmp_path / "ct.dcm").read_bytes())
    with pytest.raises(OSError):
        f.finish()  # ...but when the handler asks, so it can answer 0xA700
    f.close()


def test_abandoned_incoming_file_is_removed(tmp_path: Path) -> None:
    f = incoming.IncomingFile(str(tmp_path))
    f.write(b"\x00" * 128)
    name = f.name
    del f  # an aborted association drops the message without closing it
    assert not Path(name).exists()
    assert incoming.lookup(name) is None


def new(i: int, spool_path: str) -> NewInstance:
    return NewInstance(
        f"1.2.3.{i}", CT, "1.2.3", "1.2.3.4", ExplicitVRLittleEndian, "SCU", "127.0.0.1:1",
        spool_path, 10, "0" * 64,
    )  # fmt: skip


def test_group_commit_commits_every_concurrent_instance(queue: Queue, spool: Spool) -> None:
    group = GroupCommit(queue, spool)
    (spool.root / "2024").mkdir()
    results: dict[int, int] = {}

    def store(i: int) -> None:
        results[i] = group.enqueue(new(i, f"2024/f{i}.dcm"), sync_dir=True).id

    threads = [threading.Thread(target=store, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 40
    assert {r.sop_instance_uid for r in queue.rows()} == {f"1.2.3.{i}" for i in range(40)}
    assert group.stats.instances == 40
    assert group.stats.groups <= 40


def test_group_commit_keeps_the_latest_copy_within_a_group(queue: Queue, spool: Spool) -> None:
    results = queue.enqueue_many([new(1, "a.dcm"), new(1, "b.dcm"), new(2, "c.dcm")])
    assert results[1].replaced_spool_path == "a.dcm"
    rows = {r.sop_instance_uid: r.spool_path for r in queue.rows()}
    assert rows == {"1.2.3.1": "b.dcm", "1.2.3.2": "c.dcm"}


def test_installed_hooks_write_stowaways_meta_without_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import dimse_messages

    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))  # restored after
    monkeypatch.setattr(incoming, "_directory", None)
    incoming.install(str(tmp_path))
    f = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    assert isinstance(f, incoming.IncomingFile) and Path(f.name).parent == tmp_path
    meta = dimse_messages.create_file_meta(
        sop_class_uid=UID(CT),
        sop_instance_uid=UID("1.2.3.4"),
        transfer_syntax=UID("1.2.840.10008.1.2"),
    )
    f.write(b"\x00" * 128)
    f.write(b"DICM")
    dimse_messages.write_file_meta_info(f, meta)
    f.write(b"\x08\x00\x16\x00")  # the dataset's first bytes
    received = f.finish()
    f.close()
    header = part10_header(CT, "1.2.3.4", "1.2.840.10008.1.2")
    assert Path(received.path).read_bytes() == header + b"\x08\x00\x16\x00"
    assert received.header_length == len(header)
    # Any other file still gets what pynetdicom's originals write.
    other = BytesIO()
    dimse_messages.write_file_meta_info(other, meta)
    assert b"1.2.3.4" in other.getvalue() and b"PYNETDICOM" in other.getvalue().upper()


def test_a_retried_commit_of_the_same_receipt_replaces_nothing(queue: Queue) -> None:
    # A commit whose outcome was unknown may be retried after it succeeded: the
    # row must not be "replaced" by itself, which would delete its own file.
    first = queue.enqueue(new(7, "2024/a.dcm"))
    again = queue.enqueue_many([new(7, "2024/a.dcm")])[0]
    assert again.id == first.id and again.replaced_spool_path is None
    assert [r.spool_path for r in queue.rows()] == ["2024/a.dcm"]
