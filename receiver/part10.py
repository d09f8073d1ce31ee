"""Deterministic Part-10 headers, and reading the few header tags we need.

The spool file's file meta is built only from the SOP Class/Instance UIDs and
the negotiated transfer syntax, with a fixed implementation UID and name, so
the same instance received twice (by any stowaway version) gives a
byte-identical file: the Healthcare API answers 200 to an identical re-upload
but 409 to one that differs in any byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

#: stowaway's implementation class UID (a UUID-derived 2.25 UID; never change it)
IMPLEMENTATION_CLASS_UID = "2.25.182063347164455519478046346745532180315"
IMPLEMENTATION_VERSION_NAME = "STOWAWAY"

_HEADER_TAGS = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]


class NotDicomError(ValueError):
    """The received bytes are not a dataset we can store."""


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group, ready to prepend to a dataset."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def dataset_offset(source: BinaryIO) -> int:
    """Where the dataset starts in a Part-10 file (after its file meta group).

    pynetdicom's chunked receive writes its own file meta ahead of the bytes
    the sender sent; we keep only those bytes.
    """
    source.seek(128)
    head = source.read(16)
    # "DICM", then (0002,0000) UL, length 4, group length.
    if len(head) < 16 or head[:4] != b"DICM" or head[4:10] != b"\x02\x00\x00\x00UL":
        raise NotDicomError("no Part-10 file meta group")
    group_length: int = struct.unpack("<I", head[12:16])[0]
    return 144 + group_length


@dataclass(frozen=True)
class HeaderUIDs:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str


def read_header_uids(path: Path) -> HeaderUIDs:
    """Read the four UIDs stowaway queues by, without loading pixel data."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, defer_size=4096)
        values = {tag: str(ds.get(tag, "") or "").strip("\0 ") for tag in _HEADER_TAGS}
    except Exception as exc:  # pydicom raises many types for malformed data
        raise NotDicomError(f"cannot parse dataset: {exc}") from exc
    for tag in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not values[tag]:
            raise NotDicomError(f"dataset has no {tag}")
    for tag, value in values.items():
        if len(value) > 64:
            raise NotDicomError(f"{tag} is longer than 64 characters")
    return HeaderUIDs(
        values["SOPInstanceUID"],
        values["SOPClassUID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
    )
