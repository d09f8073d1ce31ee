"""Deterministic Part-10 headers, and reading the few header tags we need.

The spool file's file meta is built only from the SOP Class/Instance UIDs and
the negotiated transfer syntax, with a fixed implementation UID and name, so
the same instance received twice (by any stowaway version) gives a
byte-identical file: the Healthcare API answers 200 to an identical re-upload
but 409 to one that differs in any byte.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import read_file_meta_info, read_partial
from pydicom.tag import Tag

#: stowaway's implementation class UID (a UUID-derived 2.25 UID; never change it)
IMPLEMENTATION_CLASS_UID = "2.25.182063347164455519478046346745532180315"
IMPLEMENTATION_VERSION_NAME = "STOWAWAY"

_HEADER_TAGS = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
#: Explicit VR elements whose length field is 4 bytes (after 2 reserved bytes).
LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


class NotDicomError(ValueError):
    """The received bytes are not a dataset we can store."""


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group, ready to prepend to a dataset.

    Encoded by hand (Explicit VR Little Endian, elements in tag order, UIDs
    padded with NUL and the version name with a space, as pydicom writes them;
    a unit test compares the two byte for byte): building it through pydicom's
    dataset machinery costs about a millisecond per instance.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _ui(uid: str) -> bytes:
    return _even(uid.encode("ascii"), b"\x00")


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-2 element, Explicit VR Little Endian."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


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


#: How far into a dataset the UIDs are looked for with the byte scan (no objects
#: made): far beyond where any real instance has its study and series UIDs.
SCAN_LIMIT = 1024 * 1024
#: How much of a file pydicom may parse when the scan cannot decide. pydicom
#: makes an object per element: a megabyte of tiny sequence items costs it
#: about 50 MB and seconds, so it gets far less than the scan.
PARSE_LIMIT = 128 * 1024


def read_header_uids(
    path: Path, head: bytes | None = None, transfer_syntax_uid: str = ""
) -> HeaderUIDs:
    """Read the four UIDs stowaway queues by, in bounded memory and time.

    ``head``, when given, is the start of the dataset (no file meta) encoded in
    ``transfer_syntax_uid``: the UIDs are scanned from it directly. When it
    ends before them, the first :data:`SCAN_LIMIT` bytes of the dataset in the
    file at ``path`` are scanned; when the scan cannot decide, pydicom parses
    the first :data:`PARSE_LIMIT` bytes of the file. UIDs that lie beyond
    those limits (behind a huge sequence, say) are a :class:`NotDicomError`,
    never an unbounded parse.
    """
    # The common case (the head holds every UID) opens no file.
    scanned = _scan(head, transfer_syntax_uid) if head is not None else None
    if isinstance(scanned, dict):
        values = scanned
    else:
        values = _read_from_file(path, head, transfer_syntax_uid, scanned)
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


def _read_from_file(
    path: Path, head: bytes | None, transfer_syntax_uid: str, scanned: _Truncated | None
) -> dict[str, str]:
    """The UIDs from the file, when ``head`` alone did not tell (see read_header_uids)."""
    try:
        with path.open("rb") as source:
            offset = dataset_offset(source)
            dataset_size = os.fstat(source.fileno()).st_size - offset
            if head is None:
                # Nothing read yet: scan the file, in a syntax the scan knows.
                head, transfer_syntax_uid = b"", _transfer_syntax(path)
                known = transfer_syntax_uid and transfer_syntax_uid not in _NOT_SCANNED
                scanned = _TRUNCATED if known else None
            if scanned is _TRUNCATED and len(head) < min(dataset_size, SCAN_LIMIT):
                source.seek(offset)
                rescanned = _scan(source.read(SCAN_LIMIT), transfer_syntax_uid)
                if isinstance(rescanned, dict):
                    return rescanned
                scanned = rescanned
    except OSError as exc:
        raise NotDicomError(f"cannot read dataset: {exc}") from exc
    if scanned is _TRUNCATED and dataset_size > SCAN_LIMIT:
        raise NotDicomError(_beyond(SCAN_LIMIT))
    return _parse_with_pydicom(path, truncated=offset + dataset_size > PARSE_LIMIT)


def _beyond(limit: int) -> str:
    return f"header UIDs not within the first {limit // 1024} KiB of the dataset"


def _transfer_syntax(path: Path) -> str:
    """The file meta's transfer syntax, or "" (then only pydicom reads the file)."""
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
    except Exception:  # pydicom raises many types for malformed data
        return ""


def _after_last_uid(tag: int, _vr: str | None, _length: int) -> bool:
    """pydicom's ``stop_when``: nothing after (0020,000E) is needed."""
    return tag > _LAST_WANTED


def _parse_with_pydicom(path: Path, *, truncated: bool) -> dict[str, str]:
    """The four UIDs as pydicom reads them from the first PARSE_LIMIT bytes of the file."""
    try:
        with path.open("rb") as source:
            prefix = io.BytesIO(source.read(PARSE_LIMIT))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut prefix is expected: judged below
            ds = read_partial(
                prefix,
                stop_when=_after_last_uid,
                specific_tags=[Tag(keyword) for keyword in _HEADER_TAGS],
                defer_size=4096,
            )
        values = {tag: str(ds.get(tag, "") or "").strip("\0 ") for tag in _HEADER_TAGS}
    except Exception as exc:  # pydicom raises many types for malformed data
        if truncated:
            raise NotDicomError(_beyond(PARSE_LIMIT)) from exc
        raise NotDicomError(f"cannot parse dataset: {exc}") from exc
    if truncated and not all(values.values()):
        raise NotDicomError(_beyond(PARSE_LIMIT))
    return values


# -- scanning the four UIDs without pydicom ---------------------------------
#
# pydicom's dcmread costs about a millisecond per instance even when told to
# stop before the pixel data, which is most of the per-instance work for small
# instances. The UIDs sit near the top of the dataset, so a scan of the first
# elements finds them: it walks top-level elements in tag order (skipping
# sequences, of defined or undefined length) and stops after (0020,000E).
# Anything it does not expect (big endian, deflate, a malformed element, a
# truncated head, a UID missing or out of order) makes it give up, and the
# caller falls back to pydicom, so it never decides differently from pydicom
# on a dataset pydicom accepts.

_WANTED_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LAST_WANTED = 0x0020000E
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: Explicit VR Big Endian and Deflated Explicit VR Little Endian: left to pydicom.
_NOT_SCANNED = frozenset(("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"))


class _GiveUp(Exception):
    pass


class _OutOfBytes(Exception):
    """A sequence runs past the end of the bytes scanned."""


class _Truncated:
    """The scan ran out of bytes before it found every UID."""


_TRUNCATED = _Truncated()


def scan_header_uids(head: bytes, transfer_syntax_uid: str) -> dict[str, str] | None:
    """The four UIDs from the start of a dataset, or None to ask pydicom instead."""
    scanned = _scan(head, transfer_syntax_uid)
    return scanned if isinstance(scanned, dict) else None


def _scan(head: bytes, transfer_syntax_uid: str) -> dict[str, str] | _Truncated | None:
    """The four UIDs; _TRUNCATED if ``head`` ends first; None if the scan cannot decide."""
    if transfer_syntax_uid in _NOT_SCANNED or not transfer_syntax_uid:
        return None
    implicit = transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN
    values: dict[str, str] = {}
    pos = 0
    try:
        while len(values) < len(_WANTED_TAGS):
            tag, vr, length, pos = _element_header(head, pos, implicit)
            if tag > _LAST_WANTED:
                break
            if length == _UNDEFINED:
                pos = _skip_items(head, pos, implicit or vr == b"UN")
                continue
            end = pos + length
            if end > len(head):
                return _TRUNCATED
            name = _WANTED_TAGS.get(tag)
            if name is not None:
                values[name] = head[pos:end].decode("ascii").strip("\0 ")
            pos = end
    except (_OutOfBytes, struct.error):
        return _TRUNCATED
    except (_GiveUp, UnicodeDecodeError, RecursionError):
        return None
    return values if len(values) == len(_WANTED_TAGS) else None


def _element_header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """Tag, VR (b"" if implicit), value length and value offset of the element at ``pos``."""
    group, element = struct.unpack_from("<HH", data, pos)
    if group == 0xFFFE:
        raise _GiveUp  # an item or delimiter where an element belongs
    tag = group << 16 | element
    if implicit:
        return tag, b"", struct.unpack_from("<I", data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        return tag, vr, struct.unpack_from("<I", data, pos + 8)[0], pos + 12
    if len(vr) != 2 or not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _GiveUp  # not an explicit VR: malformed, or a VR mismatch pydicom may handle
    return tag, vr, struct.unpack_from("<H", data, pos + 6)[0], pos + 8


def _skip_items(data: bytes, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence; returns the offset after it."""
    while True:
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _GiveUp
        pos = _skip_dataset(data, pos, implicit) if length == _UNDEFINED else pos + length
        if pos > len(data):
            raise _OutOfBytes


def _skip_dataset(data: bytes, pos: int, implicit: bool) -> int:
    """Skip an undefined-length item's dataset; returns the offset after its delimiter."""
    while True:
        group, element = struct.unpack_from("<HH", data, pos)
        if group << 16 | element == _ITEM_END:
            return pos + 8
        _tag, vr, length, pos = _element_header(data, pos, implicit)
        if length == _UNDEFINED:
            pos = _skip_items(data, pos, implicit or vr == b"UN")
        else:
            pos += length
        if pos > len(data):
            raise _OutOfBytes
