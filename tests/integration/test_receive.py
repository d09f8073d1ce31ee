"""`stowaway receive` as a real process, fed by DCMTK and pynetdicom senders."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.config import settings as pydicom_settings
from pynetdicom import AE

from tests.conftest import StowawayFactory
from tests.support.dicom_files import dataset_bytes, make_ct, make_study, read_uids
from tests.support.processes import ECHOSCU, dcmsend

pytestmark = pytest.mark.timeout(180)


def queue_rows(proc, status: str | None = None) -> list[dict]:  # type: ignore[no-untyped-def]
    args = ["queue", "ls", "--json", "--limit", "100000"]
    if status:
        args += ["--status", status]
    return json.loads(proc.cli(*args).stdout)


def spool_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "spool").glob("[0-9]*/*/*/*/*.dcm"))


def echo_as(
    port: int, called: str = "IMPORTADAPTER", calling: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "-v", "-aec", called, "-aet", calling, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_echo(stowaway: StowawayFactory) -> None:
    proc = stowaway("receive")
    result = echo_as(proc.port)
    assert result.returncode == 0, result.stderr
    assert proc.stop() == 0


def test_dcmsend_is_acknowledged_after_the_row_and_file_exist(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive")
    sent = make_ct(tmp_path / "ct.dcm", rows=128, cols=128)
    result = dcmsend(proc.port, [sent])
    assert result.returncode == 0, result.stderr
    assert "Received C-STORE Response (Success)" in result.stderr + result.stdout
    [row] = queue_rows(proc)
    uids = read_uids(sent)
    assert row["status"] == "pending"
    assert row["sop_instance_uid"] == uids.sop_uid
    assert row["study_instance_uid"] == uids.study_uid
    assert row["attempts"] == 0 and row["last_error"] is None
    assert {"id", "received_at", "size_bytes", "calling_aet"} <= row.keys()
    assert row["calling_aet"] == "DCMSEND"
    [stored] = spool_files(proc.data_dir)
    assert stored.stat().st_size == row["size_bytes"]
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(sent.read_bytes())
    # A valid Part-10 file whose meta carries no receipt details.
    meta = pydicom.dcmread(stored).file_meta
    assert meta.MediaStorageSOPInstanceUID == uids.sop_uid
    assert "SourceApplicationEntityTitle" not in meta
    stats = json.loads(proc.cli("queue", "stats", "--json").stdout)
    assert stats["pending"] == 1 and stats["done"] == 0
    assert proc.stop() == 0


@pytest.mark.parametrize("tool", ["dcmcjpeg", "dcmcrle"])
def test_compressed_instance_is_stored_untouched(
    stowaway: StowawayFactory, tmp_path: Path, tool: str
) -> None:
    plain = make_ct(tmp_path / "plain.dcm")
    compressed = tmp_path / "compressed.dcm"
    args = [
        f"/usr/bin/{tool}",
        *(["+e1"] if tool == "dcmcjpeg" else []),
        str(plain),
        str(compressed),
    ]
    subprocess.run(args, check=True, timeout=30)
    proc = stowaway("receive")
    result = dcmsend(proc.port, [compressed])
    assert result.returncode == 0, result.stderr
    [stored] = spool_files(proc.data_dir)
    original = pydicom.dcmread(compressed)
    kept = pydicom.dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert kept.file_meta.TransferSyntaxUID.is_compressed
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(compressed.read_bytes())
    [row] = queue_rows(proc)
    assert row["transfer_syntax_uid"] == str(original.file_meta.TransferSyntaxUID)


def test_same_instance_twice_gives_identical_files_and_one_pending_row(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive")
    sent = make_ct(tmp_path / "ct.dcm")
    assert dcmsend(proc.port, [sent]).returncode == 0
    first = spool_files(proc.data_dir)[0].read_bytes()
    assert dcmsend(proc.port, [sent]).returncode == 0
    rows = queue_rows(proc)
    assert len(rows) == 1 and rows[0]["status"] == "pending"
    [kept] = spool_files(proc.data_dir)  # the replaced copy was removed
    assert kept.read_bytes() == first


def test_several_associations_at_once(stowaway: StowawayFactory, tmp_path: Path) -> None:
    proc = stowaway("receive")
    batches = [make_study(tmp_path / f"s{k}", 15, seed=k) for k in range(4)]
    results: list[subprocess.CompletedProcess[str]] = []

    def send(files: list[Path]) -> None:
        results.append(dcmsend(proc.port, files))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.returncode for r in results] == [0, 0, 0, 0]
    rows = queue_rows(proc)
    expected = {read_uids(f).sop_uid for b in batches for f in b}
    assert {r["sop_instance_uid"] for r in rows} == expected
    assert len(spool_files(proc.data_dir)) == 60


def test_wrong_called_aet_is_rejected(stowaway: StowawayFactory, tmp_path: Path) -> None:
    proc = stowaway("receive")
    result = dcmsend(proc.port, [make_ct(tmp_path / "ct.dcm")], "SOMEONEELSE")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    echo = echo_as(proc.port, called="SOMEONEELSE")
    assert "Called AE Title Not Recognized" in echo.stderr + echo.stdout
    assert queue_rows(proc) == []
    assert "association_rejected" in proc.log()


def test_calling_aet_allow_list(stowaway: StowawayFactory, tmp_path: Path) -> None:
    proc = stowaway("receive", "--allowed-calling-aets", "PACS1,PACS2")
    ct = make_ct(tmp_path / "ct.dcm")
    refused = dcmsend(proc.port, [ct], "IMPORTADAPTER", "-aet", "INTRUDER")
    assert refused.returncode != 0
    echo = echo_as(proc.port, calling="INTRUDER")
    assert "Calling AE Title Not Recognized" in echo.stderr + echo.stdout
    accepted = dcmsend(proc.port, [ct], "IMPORTADAPTER", "-aet", "PACS2")
    assert accepted.returncode == 0, accepted.stderr
    assert len(queue_rows(proc)) == 1


def test_unwritable_spool_answers_failure_and_leaves_no_row(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive")
    # incoming/ receives the dataset (and becomes the spool file); tmp/ is where
    # the copy goes when the file meta must be rebuilt. We run as root, so
    # permissions do not stop writes: replace both directories with files,
    # which no user can write into.
    broken = [proc.data_dir / "spool" / "incoming", proc.data_dir / "spool" / "tmp"]
    for directory in broken:
        shutil.rmtree(directory)
        directory.write_bytes(b"")
    ct = make_ct(tmp_path / "ct.dcm")
    result = dcmsend(proc.port, [ct])
    output = result.stderr + result.stdout
    assert "Refused: OutOfResources" in output, output
    assert "with status REFUSED  : 1" in output
    assert queue_rows(proc) == []
    assert spool_files(proc.data_dir) == []
    # Space comes back: the next attempt succeeds without a restart.
    for directory in broken:
        directory.unlink()
        directory.mkdir()
    # Readiness probes the spool every few seconds and may have paused the
    # listener meanwhile; it resumes by itself.
    deadline = time.monotonic() + 20
    while (again := dcmsend(proc.port, [ct])).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert again.returncode == 0, again.stderr
    assert len(queue_rows(proc)) == 1


def test_path_traversal_uid_stays_inside_the_spool(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive")
    evil = "../../../../escaped"
    original_mode = pydicom_settings.writing_validation_mode
    pydicom_settings.writing_validation_mode = pydicom.config.IGNORE  # a bad UID on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = make_ct(tmp_path / "evil.dcm", sop_uid=evil)
        ds = pydicom.dcmread(ct)
        ae = AE(ae_title="EVIL")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
    pydicom_settings.writing_validation_mode = original_mode
    assert status.Status == 0x0000
    [row] = queue_rows(proc)
    assert row["sop_instance_uid"] == evil
    [stored] = spool_files(proc.data_dir)
    assert stored.resolve().is_relative_to((proc.data_dir / "spool").resolve())
    assert not list(tmp_path.parent.glob("**/escaped*"))


def test_not_dicom_is_refused_with_a_comment(stowaway: StowawayFactory, tmp_path: Path) -> None:
    proc = stowaway("receive")
    ct = make_ct(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(ct)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="IMPORTADAPTER")
    assert assoc.is_established
    del ds.StudyInstanceUID
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC210
    assert "StudyInstanceUID" in status.ErrorComment
    assert queue_rows(proc) == []
