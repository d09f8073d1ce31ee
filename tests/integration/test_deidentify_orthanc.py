"""Redacted (and transcoded) output stored by a real Orthanc: the profile's table holds in
Orthanc's copy tag by tag, the pixels are the same, re-sends deduplicate, and a study's
references still point at its own (new) instances."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from stowaway.forwarder.deidentify import RedactionSpec, Redactor
from stowaway.forwarder.deidentify.profiles import is_private
from stowaway.forwarder.transcode import TranscodeTarget, transcode
from tests.support.dicom_files import uid_for
from tests.support.orthanc import OrthancServer
from tests.support.phi_instances import PHI_ID, PHI_NAME, make_phi_ct
from tests.support.profile_check import check_against_profile

KEY = b"integration-test-key-0123456789ab"


@pytest.fixture
def redactor(tmp_path: Path) -> Redactor:
    key = tmp_path / "uid.key"
    key.write_bytes(KEY)
    return Redactor(RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_key_file": str(key)}))


def redact(redactor: Redactor, path: Path) -> bytes:
    out = io.BytesIO()
    redactor.write(path, out)
    return out.getvalue()


def stow(orthanc: OrthancServer, files: list[bytes]) -> None:
    answer = orthanc.stow(files)
    assert not answer.get("00081198", {}).get("Value"), answer  # FailedSOPSequence empty
    assert len(answer["00081199"]["Value"]) == len(files)


def test_de_identified_instance_arrives_as_the_profile_says(
    orthanc: OrthancServer, redactor: Redactor, tmp_path: Path
) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm", rows=64, cols=64)
    spooled = hashlib.sha256(src.read_bytes()).hexdigest()
    redacted = redact(redactor, src)
    stow(orthanc, [redacted])
    original = pydicom.dcmread(src)
    new_sop = redactor.mapper.map(original.SOPInstanceUID)
    assert orthanc.instance_uids() == {new_sop}
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_bytes(new_sop)))
    assert check_against_profile(redactor, original, stored, redactor.mapper, "") > 60
    assert not any(is_private(int(e.tag)) for e in stored)
    assert stored.PixelData == original.PixelData
    text = repr(stored)
    assert PHI_NAME not in text and PHI_ID not in text and "General Hospital" not in text
    # the spool keeps the original bytes: a clinical destination gets them unchanged
    assert hashlib.sha256(src.read_bytes()).hexdigest() == spooled


def test_a_resent_instance_is_one_instance_at_the_destination(
    orthanc: OrthancServer, redactor: Redactor, tmp_path: Path
) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm")
    first = redact(redactor, src)
    stow(orthanc, [first])
    # received again: the receiver's spool file is byte-identical, and so is its redaction
    copy = tmp_path / "again.dcm"
    copy.write_bytes(src.read_bytes())
    second = redact(redactor, copy)
    assert second == first
    stow(orthanc, [second])
    assert orthanc.count() == 1


def test_a_two_instance_study_keeps_its_references(
    orthanc: OrthancServer, redactor: Redactor, tmp_path: Path
) -> None:
    study, series = uid_for("deid-study"), uid_for("deid-series")
    sop_b = uid_for("sop", 0, study, series, 2)
    a = make_phi_ct(
        tmp_path / "a.dcm",
        instance_number=1,
        study_uid=study,
        series_uid=series,
        referenced_sop_uid=sop_b,
    )
    sop_a = str(pydicom.dcmread(a).SOPInstanceUID)
    b = make_phi_ct(
        tmp_path / "b.dcm",
        instance_number=2,
        study_uid=study,
        series_uid=series,
        referenced_sop_uid=sop_a,
    )
    assert str(pydicom.dcmread(b).SOPInstanceUID) == sop_b
    stow(orthanc, [redact(redactor, a), redact(redactor, b)])
    new_a, new_b = redactor.mapper.map(sop_a), redactor.mapper.map(sop_b)
    assert orthanc.instance_uids() == {new_a, new_b}
    stored_a = pydicom.dcmread(io.BytesIO(orthanc.instance_bytes(new_a)))
    stored_b = pydicom.dcmread(io.BytesIO(orthanc.instance_bytes(new_b)))
    assert stored_a.StudyInstanceUID == stored_b.StudyInstanceUID != study
    assert stored_a.SeriesInstanceUID == stored_b.SeriesInstanceUID != series
    assert stored_a.FrameOfReferenceUID == stored_b.FrameOfReferenceUID
    assert stored_a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_b
    assert stored_a.SourceImageSequence[0].ReferencedSOPInstanceUID == new_b
    assert stored_b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_a
    assert stored_a.ReferencedSeriesSequence[0].SeriesInstanceUID == stored_a.SeriesInstanceUID


def test_redacted_and_losslessly_compressed_copy_has_identical_pixels(
    orthanc: OrthancServer, redactor: Redactor, tmp_path: Path
) -> None:
    src = make_phi_ct(tmp_path / "phi.dcm", rows=64, cols=64)
    redacted = tmp_path / "redacted.dcm"
    with open(redacted, "wb") as out:
        redactor.write(src, out)
    compressed = tmp_path / "compressed.dcm"
    result = transcode(redacted, compressed, TranscodeTarget.from_config(str(JPEG2000Lossless)))
    assert result.applied, result.reason
    stow(orthanc, [compressed.read_bytes()])
    new_sop = redactor.mapper.map(pydicom.dcmread(src).SOPInstanceUID)
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_bytes(new_sop)))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert stored.PatientName == ""
    np.testing.assert_array_equal(stored.pixel_array, pydicom.dcmread(src).pixel_array)
