"""Proves tests/support: a real Orthanc on loopback and deterministic synthetic DICOM files."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.dicom_files import dataset_bytes, make_ct, make_study, read_uids, uid_for
from tests.support.orthanc import OrthancServer

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _stow(dicomweb_url: str, files: list[bytes]) -> requests.Response:
    boundary = "a1b2c3d4e5f6-stowaway"
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
            for f in files
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    with requests.Session() as s:
        s.trust_env = False  # never let a proxy setting route loopback traffic away
        return s.post(
            f"{dicomweb_url}/studies",
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
            timeout=30,
        )


def test_generated_ct_is_valid_and_deterministic(tmp_path: Path) -> None:
    a = make_ct(tmp_path / "a.dcm", rows=32, cols=48, seed=7)
    b = make_ct(tmp_path / "b.dcm", rows=32, cols=48, seed=7)
    c = make_ct(tmp_path / "c.dcm", rows=32, cols=48, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()

    ds = pydicom.dcmread(a)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert (ds.Rows, ds.Columns) == (32, 48)
    assert len(ds.PixelData) == 32 * 48 * 2
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert UID_RE.match(uid) and len(uid) <= 64
    assert ds.SOPInstanceUID != pydicom.dcmread(c).SOPInstanceUID

    explicit = make_ct(
        tmp_path / "d.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5"
    )
    assert read_uids(explicit).sop_uid == "1.2.3.4.5"
    assert read_uids(explicit).study_uid == "1.2.3"
    # The dataset part excludes the group 0002 meta and starts with (0008,0005).
    assert dataset_bytes(a.read_bytes())[:4] == b"\x08\x00\x05\x00"


def test_make_study_shares_study_and_series(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", 5, rows=16, cols=16, seed=3)
    assert [f.name for f in files] == [f"ct-{i:04d}.dcm" for i in range(1, 6)]
    uids = [read_uids(f) for f in files]
    assert {u.study_uid for u in uids} == {uid_for("study", 3)}
    assert len({u.series_uid for u in uids}) == 1
    assert len({u.sop_uid for u in uids}) == 5
    again = make_study(tmp_path / "again", 5, rows=16, cols=16, seed=3)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]


def test_stow_then_qido_and_instance_bytes(orthanc: OrthancServer, tmp_path: Path) -> None:
    assert orthanc.url.startswith("http://127.0.0.1:")
    assert orthanc.dicomweb_url == orthanc.url + "/dicom-web"
    assert orthanc.count() == 0

    path = make_ct(tmp_path / "one.dcm", rows=64, cols=64, seed=11)
    sent = path.read_bytes()
    uids = read_uids(path)

    r = _stow(orthanc.dicomweb_url, [sent])
    assert r.status_code == 200, r.text
    body = r.json()
    assert "00081198" not in body or not body["00081198"].get("Value")  # FailedSOPSequence
    referenced = body["00081199"]["Value"]  # ReferencedSOPSequence
    assert [item["00081155"]["Value"][0] for item in referenced] == [uids.sop_uid]

    assert orthanc.instance_uids() == {uids.sop_uid}
    assert orthanc.qido_instance_uids() == {uids.sop_uid}
    assert orthanc.qido_instance_uids(StudyInstanceUID=uids.study_uid) == {uids.sop_uid}
    assert orthanc.count() == 1

    stored = orthanc.instance_bytes(uids.sop_uid)
    assert dataset_bytes(stored) == dataset_bytes(sent)
    stored_path = tmp_path / "stored.dcm"
    stored_path.write_bytes(stored)
    assert pydicom.dcmread(stored_path).SOPInstanceUID == uids.sop_uid
    assert orthanc.orthanc_id("1.2.3.999") is None


def test_stow_several_then_reset(orthanc: OrthancServer, tmp_path: Path) -> None:
    files = make_study(tmp_path / "s", 3, rows=16, cols=16, seed=21)
    r = _stow(orthanc.dicomweb_url, [f.read_bytes() for f in files])
    assert r.status_code == 200, r.text
    assert orthanc.wait_for_count(3, timeout=10) == 3
    assert orthanc.instance_uids() == {read_uids(f).sop_uid for f in files}
    orthanc.reset()
    assert orthanc.count() == 0


def test_dicom_port_answers_c_echo(orthanc: OrthancServer) -> None:
    ae = AE(ae_title="STOWAWAYTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    finally:
        assoc.release()


def test_server_context_manager_stops_and_keeps_log(tmp_path: Path) -> None:
    with OrthancServer(tmp_path / "own") as server:
        pid = server.pid
        assert pid is not None and server.is_running()
        assert server.get_json("/system")["DicomAet"] == "ORTHANC"
        assert "dicom-web" in server.get_json("/plugins")
    assert not server.is_running()
    assert server.log_path.is_file()
    assert "Orthanc has started" in server.log_path.read_text()
