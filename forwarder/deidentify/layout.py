"""Where things are in a Part-10 file, read without loading its pixel data.

``read_layout`` parses the file meta, the dataset up to the pixel data element, that
element's extent (walking encapsulated fragments by their headers only) and the elements
after it. Redaction and transcoding rewrite the first part and stream the pixel data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_partial
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian

from stowaway.db.part10 import LONG_VRS

__all__ = [
    "MAX_TAIL_BYTES",
    "Part10Layout",
    "PixelSpan",
    "UnsupportedInstance",
    "file_start",
    "read_layout",
]

# Values larger than this stay on disk while the header is parsed; a kept one is read when
# the header is written (PixelData never is: it is not part of the header).
DEFER_BYTES = 1 << 20
# After the pixel data normally come only a digital signature or padding.
MAX_TAIL_BYTES = 16 << 20
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
PREAMBLE = bytes(128) + b"DICM"  # zeroed: a preamble may carry anything (a TIFF header...)


class UnsupportedInstance(ValueError):
    """A file that cannot be rewritten without loading it whole (one line says why)."""


@dataclass(frozen=True)
class PixelSpan:
    """The pixel data element in the source file: ``[start, end)`` with its header."""

    tag: int
    vr: str | None  # None in implicit VR
    start: int
    value_offset: int
    value_length: int | None  # None: undefined length (encapsulated fragments)
    end: int


@dataclass(frozen=True)
class Part10Layout:
    path: Path
    file_meta: FileMetaDataset
    transfer_syntax: UID
    implicit_vr: bool
    little_endian: bool
    header: FileDataset  # every top-level element before the pixel data
    pixel: PixelSpan | None
    tail: Dataset  # top-level elements after the pixel data
    size: int


def _read_pixel_span(fp: BinaryIO, start: int, implicit: bool, little: bool) -> PixelSpan:
    e = "<" if little else ">"
    head = fp.read(8)
    if len(head) < 8:
        raise UnsupportedInstance("the file ends inside the pixel data element header")
    group, element = struct.unpack(e + "HH", head[:4])
    vr: str | None = None
    if implicit:
        (length,) = struct.unpack(e + "L", head[4:8])
        value_offset = start + 8
    elif head[4:6] in LONG_VRS:
        vr = head[4:6].decode("ascii")
        (length,) = struct.unpack(e + "L", fp.read(4))
        value_offset = start + 12
    else:
        vr = head[4:6].decode("ascii", "replace")
        (length,) = struct.unpack(e + "H", head[6:8])
        value_offset = start + 8
    tag = group << 16 | element
    if length != _UNDEFINED:
        return PixelSpan(tag, vr, start, value_offset, length, value_offset + length)
    # Encapsulated: items (offset table, fragments) until the sequence delimiter; only
    # their 8-byte headers are read.
    pos = value_offset
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise UnsupportedInstance("the file ends inside the encapsulated pixel data")
        item_group, item_element, item_length = struct.unpack(e + "HHL", item)
        item_tag = item_group << 16 | item_element
        pos += 8
        if item_tag == _SEQUENCE_DELIMITER:
            return PixelSpan(tag, vr, start, value_offset, None, pos)
        if item_tag != _ITEM or item_length == _UNDEFINED:
            raise UnsupportedInstance(f"unexpected element {item_tag:08X} in the pixel data")
        pos += item_length


def read_layout(path: Path) -> Part10Layout:
    """The layout of the Part-10 file at ``path`` (pixel data located, never read)."""
    size = path.stat().st_size
    with open(path, "rb") as fp:
        try:
            header = read_partial(
                fp,
                stop_when=lambda tag, vr, length: int(tag) in PIXEL_TAGS,
                defer_size=DEFER_BYTES,
            )
        except Exception as exc:  # pydicom raises many types for a malformed file
            raise UnsupportedInstance(f"not a readable DICOM file: {exc}") from None
        ts = header.file_meta.get("TransferSyntaxUID")
        if ts is None:
            raise UnsupportedInstance("the file meta has no TransferSyntaxUID")
        ts = UID(ts)
        if ts == DeflatedExplicitVRLittleEndian:
            raise UnsupportedInstance("Deflated Explicit VR Little Endian cannot be streamed")
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        pixel: PixelSpan | None = None
        tail = Dataset()
        at = fp.tell()
        if at < size:
            pixel = _read_pixel_span(fp, at, implicit, little)
            if size - pixel.end > MAX_TAIL_BYTES:
                raise UnsupportedInstance(
                    f"{size - pixel.end} bytes follow the pixel data (at most {MAX_TAIL_BYTES})"
                )
            fp.seek(pixel.end)
            tail = read_dataset(fp, implicit, little, parent_encoding=header._character_set)
    return Part10Layout(path, header.file_meta, ts, implicit, little, header, pixel, tail, size)


def file_start(layout: Part10Layout, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble and file meta of a rewritten file: only what PS3.10 needs (the source's AE
    titles and private meta elements stay out), the source's implementation identity."""
    original = layout.file_meta
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(
        original.get("MediaStorageSOPClassUID", layout.header.get("SOPClassUID", ""))
    )
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(
        original.get("ImplementationClassUID") or PYDICOM_IMPLEMENTATION_UID
    )
    if "ImplementationVersionName" in original:
        meta.ImplementationVersionName = original.ImplementationVersionName
    buffer = DicomBytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()
