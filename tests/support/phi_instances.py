"""Synthetic instances full of identifying data, for the de-identification tests.

``write_sparse_ct`` writes a big multi-frame CT cheaply (zeros, by a seek).

``make_phi_ct`` writes a CT (on top of ``dicom_files.make_ct``) that adds what a profile must
deal with: names and IDs at the top level and inside sequences, dates, private tags (a
private creator with a private element, and a private sequence), references to other
instances, and trailing padding. Every value is deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian

from tests.support.dicom_files import make_ct, uid_for

__all__ = ["PHI_ID", "PHI_NAME", "PRIVATE_CREATOR_TAG", "PRIVATE_TAG", "make_phi_ct"]

PHI_NAME = "Doe^Jane"
PHI_ID = "MRN-0042"
PRIVATE_CREATOR_TAG = 0x00090010
PRIVATE_TAG = 0x00091001
PRIVATE_SEQUENCE_TAG = 0x00091002


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def make_phi_ct(
    path: str | Path,
    *,
    seed: int = 0,
    instance_number: int = 1,
    study_uid: str | None = None,
    series_uid: str | None = None,
    referenced_sop_uid: str | None = None,
    implicit: bool = False,
    rows: int = 16,
    cols: int = 16,
) -> Path:
    """One CT with identifying data everywhere; returns its path.

    ``referenced_sop_uid`` goes into ReferencedImageSequence and SourceImageSequence (for
    the cross-instance reference tests); by default the instance references itself.
    """
    path = make_ct(
        path,
        rows,
        cols,
        seed=seed,
        instance_number=instance_number,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=PHI_ID,
        patient_name=PHI_NAME,
    )
    ds = pydicom.dcmread(path)
    sop = str(ds.SOPInstanceUID)
    ref = referenced_sop_uid or sop
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "1 Main Street"
    ds.StationName = "CT-ROOM-1"
    ds.OperatorsName = "Tech^Tom"
    ds.PatientAge = "054Y"
    ds.OtherPatientIDs = "OTHER-1"
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = "101600"
    ds.InstanceCreationDate = "20240102"
    ds.DeviceSerialNumber = "SN-12345"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.ReferencedImageSequence = Sequence(
        [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ref)]
    )
    ds.SourceImageSequence = Sequence(
        [
            _item(
                ReferencedSOPClassUID=CTImageStorage,
                ReferencedSOPInstanceUID=ref,
                # an identifying element nested two levels deep
                PurposeOfReferenceCodeSequence=Sequence(
                    [
                        _item(
                            CodeValue="121320",
                            CodingSchemeDesignator="DCM",
                            CodeMeaning="Uncompressed predecessor",
                            PersonName=PHI_NAME,
                        )
                    ]
                ),
            )
        ]
    )
    ds.ReferencedSeriesSequence = Sequence(
        [_item(SeriesInstanceUID=str(ds.SeriesInstanceUID), PatientName=PHI_NAME)]
    )
    ds.AnatomicRegionSequence = Sequence(
        [
            _item(
                CodeValue="T-D3000",
                CodingSchemeDesignator="SRT",
                CodeMeaning="Chest",
                PatientID=PHI_ID,
                StudyDate="20240102",
            )
        ]
    )
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID="OTHER-1", IssuerOfPatientID="X")])
    ds.FrameOfReferenceUID = uid_for("frame", seed, str(ds.StudyInstanceUID))
    ds.add_new(PRIVATE_CREATOR_TAG, "LO", "STOWAWAY TEST")
    ds.add_new(PRIVATE_TAG, "LO", f"private {PHI_NAME}")
    ds.add_new(PRIVATE_SEQUENCE_TAG, "SQ", Sequence([_item(PatientName=PHI_NAME)]))
    ds.DataSetTrailingPadding = b"\x00" * 8
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sparse_ct(path: Path, pixel_bytes: int) -> None:
    """A multi-frame CT whose PixelData is ``pixel_bytes`` of zeros, written with a seek."""
    frame = 512 * 512 * 2
    assert pixel_bytes % frame == 0
    make_ct(path, 512, 512, patient_name="Doe^Jane")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.NumberOfFrames = pixel_bytes // frame
    ds.save_as(path, enforce_file_format=True)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little"))
        f.truncate(f.tell() + pixel_bytes)
