"""Deterministic synthetic DICOM Part-10 files for tests.

Everything here is a pure function of its arguments: the same ``seed`` (and the same
pydicom version, which is written into ImplementationVersionName) gives byte-identical
files, so tests can compare what a server stored with what was generated.

Public API:
    make_ct(path, rows=64, cols=64, *, study_uid=None, series_uid=None, sop_uid=None,
            seed=0, instance_number=1, patient_id=..., patient_name=...) -> Path
    make_study(directory, n, *, rows=64, cols=64, seed=0, study_uid=None,
               series_uid=None, patient_id=..., patient_name=...) -> list[Path]
    uid_for(*parts) -> str          deterministic UID from any parts
    read_uids(path) -> DicomUids    (study, series, sop, sop class) of a file
    dataset_bytes(part10) -> bytes  the encoded dataset after the file meta group
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from stowaway.db.part10 import LONG_VRS

__all__ = [
    "DEFAULT_PATIENT_ID",
    "DEFAULT_PATIENT_NAME",
    "DicomUids",
    "dataset_bytes",
    "make_ct",
    "make_study",
    "read_uids",
    "uid_for",
]

DEFAULT_PATIENT_ID = "STOWAWAY-TEST"
DEFAULT_PATIENT_NAME = "Stowaway^Test"
_ENTROPY_NAMESPACE = "stowaway-tests"


def uid_for(*parts: object) -> str:
    """A valid UID (under pydicom's root) that depends only on ``parts``."""
    return str(generate_uid(entropy_srcs=[_ENTROPY_NAMESPACE, *(str(p) for p in parts)]))


@dataclass(frozen=True)
class DicomUids:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


def _pixel_bytes(rows: int, cols: int, seed: int, instance_number: int) -> bytes:
    """16-bit little-endian pixels from a seeded PRNG (incompressible, like noise)."""
    rng = random.Random(f"{_ENTROPY_NAMESPACE}/pixels/{seed}/{instance_number}")
    return rng.randbytes(rows * cols * 2)


def make_ct(
    path: str | Path,
    rows: int = 64,
    cols: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
    instance_number: int = 1,
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
) -> Path:
    """Write one CT Image Storage instance (explicit VR little endian) and return its path.

    The file is about ``rows * cols * 2`` bytes plus ~1 KiB of header. Missing UIDs are
    derived from ``seed`` (study, series) and from ``seed`` + ``instance_number`` (SOP),
    so ``make_ct(p, seed=s)`` always produces the same file.
    """
    if rows < 1 or cols < 1:
        raise ValueError("rows and cols must be positive")
    path = Path(path)
    study_uid = study_uid or uid_for("study", seed)
    series_uid = series_uid or uid_for("series", seed, study_uid)
    sop_uid = sop_uid or uid_for("sop", seed, study_uid, series_uid, instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{seed:08d}"[-16:]
    ds.Modality = "CT"
    ds.Manufacturer = "stowaway-tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic CT"
    ds.SeriesDescription = f"Synthetic CT seed {seed}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = uid_for("frame", seed, study_uid)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = float(instance_number)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = _pixel_bytes(rows, cols, seed, instance_number)
    ds["PixelData"].VR = "OW"

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(
    directory: str | Path,
    n: int,
    *,
    rows: int = 64,
    cols: int = 64,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
) -> list[Path]:
    """Write ``n`` CT instances of one study and one series into ``directory``.

    Files are named ``ct-0001.dcm`` ... in instance-number order and returned in that order.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    directory = Path(directory)
    study_uid = study_uid or uid_for("study", seed)
    series_uid = series_uid or uid_for("series", seed, study_uid)
    return [
        make_ct(
            directory / f"ct-{i:04d}.dcm",
            rows,
            cols,
            study_uid=study_uid,
            series_uid=series_uid,
            seed=seed,
            instance_number=i,
            patient_id=patient_id,
            patient_name=patient_name,
        )
        for i in range(1, n + 1)
    ]


def read_uids(path: str | Path) -> DicomUids:
    """The identifying UIDs of a Part-10 file (pixel data is not read)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return DicomUids(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
    )


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded dataset of a Part-10 file, i.e. everything after the group 0002 meta.

    Useful to compare what a server stored with what was sent when the server may have
    rewritten the file meta (e.g. its own ImplementationClassUID or SourceApplicationEntityTitle).
    """
    if len(part10) < 132 or part10[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix at offset 128)")
    pos = 132
    while pos + 8 <= len(part10):
        group = int.from_bytes(part10[pos : pos + 2], "little")
        if group != 0x0002:
            break
        vr = part10[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length = int.from_bytes(part10[pos + 8 : pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(part10[pos + 6 : pos + 8], "little")
            pos += 8 + length
    return part10[pos:]
