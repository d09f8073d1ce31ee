"""Deterministic file meta and header reading."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from stowaway.db.part10 import (
    NotDicomError,
    dataset_offset,
    part10_header,
    read_header_uids,
)
from tests.support.dicom_files import dataset_bytes, make_ct


def test_header_is_deterministic_and_valid(tmp_path: Path) -> None:
    a = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    b = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    assert a == b
    src = make_ct(tmp_path / "ct.dcm")
    combined = tmp_path / "combined.dcm"
    combined.write_bytes(a + dataset_bytes(src.read_bytes()))
    ds = pydicom.dcmread(combined)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.ImplementationVersionName == "STOWAWAY"
    with combined.open("rb") as f:
        assert dataset_offset(f) == len(a)


def test_read_header_uids(tmp_path: Path) -> None:
    src = make_ct(tmp_path / "ct.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    uids = read_header_uids(src)
    assert (uids.study_instance_uid, uids.series_instance_uid, uids.sop_instance_uid) == (
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
    )


def test_garbage_is_not_dicom(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    with pytest.raises(NotDicomError):
        read_header_uids(junk)
    with junk.open("rb") as f, pytest.raises(NotDicomError):
        dataset_offset(f)
