"""Redact one spooled instance into a new Part-10 stream, the pixel data copied, never loaded.

The header (file meta and every element before the pixel data) is parsed, redacted and
re-encoded in the source's transfer syntax; the pixel data element is then copied byte for
byte from the spool file, followed by the redacted elements after it. Elements that are
kept are written back as they were read, so the same source always gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from stowaway.forwarder.deidentify.layout import (
    Part10Layout,
    UnsupportedInstance,
    file_start,
    read_layout,
)
from stowaway.forwarder.deidentify.profiles import (
    DATA_SET_TRAILING_PADDING,
    Action,
    is_private,
)
from stowaway.forwarder.deidentify.spec import Mode, RedactionSpec
from stowaway.forwarder.deidentify.tags import format_tag
from stowaway.forwarder.deidentify.uids import UidMapper, UidScheme

__all__ = ["CHUNK_SIZE", "RedactedInstance", "RedactionError", "RedactionReport", "Redactor"]

CHUNK_SIZE = 1 << 20

# A fixed, non-identifying value per VR for Annex E's "D" (VRs without one are emptied).
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
# Annex E code values (PS3.16 CID 7050) recorded in DeidentificationMethodCodeSequence.
_BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
_FULL_DATES_CODE = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")


class RedactionError(ValueError):
    """This instance cannot be redacted (never sent un-redacted; one line says why)."""


@dataclass(frozen=True)
class RedactionReport:
    """What one redaction did: counts and tags, never values (for ``queue show``)."""

    profile: str
    uid_scheme: str
    removed: int
    emptied: int
    replaced: int
    uids_mapped: int
    private_removed: int
    tags: tuple[str, ...]  # every tag changed, "(gggg,eeee)", sorted
    sop_instance_uid: str  # the new ones
    study_instance_uid: str
    series_instance_uid: str
    burned_in_annotation: bool  # the pixels say YES: redaction never touches pixels

    def as_dict(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "uid_scheme": self.uid_scheme,
            "removed": self.removed,
            "emptied": self.emptied,
            "replaced": self.replaced,
            "uids_mapped": self.uids_mapped,
            "private_removed": self.private_removed,
            "tags": list(self.tags),
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "burned_in_annotation": self.burned_in_annotation,
        }


@dataclass
class _Tally:
    removed: int = 0
    emptied: int = 0
    replaced: int = 0
    uids_mapped: int = 0
    private_removed: int = 0
    tags: set[int] = field(default_factory=set)


def _vr_of(elem: DataElement | RawDataElement, tag: int) -> str:
    if elem.VR:
        return str(elem.VR)
    try:
        # "US or SS", "OB or OW": the first is as good as any for an emptied value
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def _is_empty(elem: DataElement | RawDataElement) -> bool:
    # A deferred value (over layout.DEFER_BYTES) reads as None but is not empty.
    if isinstance(elem, RawDataElement):
        return elem.length == 0
    return bool(elem.is_empty)


def _raw_text(elem: DataElement | RawDataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace")
        return text.split("\\") if text else []
    if isinstance(value, str):
        return value.split("\\") if value else []
    return [str(v) for v in value]


class Redactor:
    """Applies one ``RedactionSpec``; thread-safe (holds only the spec and the UID mapper)."""

    def __init__(self, spec: RedactionSpec, mapper: UidMapper | None = None) -> None:
        if mapper is None:
            if spec.uid_scheme is UidScheme.GOOGLE:
                mapper = UidMapper(UidScheme.GOOGLE)
            else:
                assert spec.uid_key_file is not None  # RedactionSpec.validate guarantees it
                mapper = UidMapper.from_key_file(spec.uid_key_file)
        self.spec = spec
        self.mapper = mapper

    def prepare(self, source: Path) -> RedactedInstance:
        """Parse and redact the header of ``source``; the pixel data is read only when the
        result is written or iterated. Raises ``RedactionError``."""
        try:
            layout = read_layout(source)
        except UnsupportedInstance as exc:
            raise RedactionError(str(exc)) from None
        tally = _Tally()
        header = layout.header
        self._redact(header, tally, top_level=True)
        self._redact(layout.tail, tally, top_level=True)
        if self.spec.mode is Mode.DICOM_BASIC:
            self._mark_deidentified(header)
        keep_pixels = layout.pixel is not None and (
            self._action(layout.pixel.tag, top_level=True) is not Action.EMPTY
        )
        transfer_syntax = layout.transfer_syntax
        if layout.pixel is not None and not keep_pixels:
            tally.emptied += 1
            tally.tags.add(layout.pixel.tag)
            header[layout.pixel.tag] = DataElement(layout.pixel.tag, layout.pixel.vr or "OB", b"")
            if transfer_syntax.is_encapsulated:
                # No fragments left: native encoding, as Google's redactor does.
                transfer_syntax = ExplicitVRLittleEndian
        sop_uid = str(header.get("SOPInstanceUID", ""))
        if not sop_uid:
            sop_uid = self.mapper.map(str(layout.file_meta.get("MediaStorageSOPInstanceUID", "")))
        head = file_start(layout, sop_uid, transfer_syntax)
        head += self._encode(header, layout)
        tail = self._encode(layout.tail, layout) if len(layout.tail) else b""
        report = RedactionReport(
            profile=self.spec.name,
            uid_scheme=self.mapper.scheme.value,
            removed=tally.removed,
            emptied=tally.emptied,
            replaced=tally.replaced,
            uids_mapped=tally.uids_mapped,
            private_removed=tally.private_removed,
            tags=tuple(format_tag(t) for t in sorted(tally.tags)),
            sop_instance_uid=sop_uid,
            study_instance_uid=str(header.get("StudyInstanceUID", "")),
            series_instance_uid=str(header.get("SeriesInstanceUID", "")),
            burned_in_annotation=str(header.get("BurnedInAnnotation", "")).upper() == "YES",
        )
        span = (layout.pixel.start, layout.pixel.end) if layout.pixel and keep_pixels else None
        return RedactedInstance(source, head, span, tail, report, str(transfer_syntax))

    def write(self, source: Path, out: BinaryIO) -> RedactionReport:
        """Write the redacted Part-10 file of ``source`` to ``out``; returns what was done."""
        return self.prepare(source).write(out)

    # ------------------------------------------------------------------ the rules

    def _action(self, tag: int, *, top_level: bool) -> Action:
        if tag == DATA_SET_TRAILING_PADDING:
            return Action.REMOVE  # padding may hold anything and means nothing
        if top_level and (decided := self.spec.top_level_action(tag)) is not None:
            return decided
        return self.spec.action(tag)

    def _redact(self, ds: Dataset, tally: _Tally, *, top_level: bool) -> None:
        for tag in list(ds.keys()):
            t = int(tag)
            if t & 0xFFFF == 0:
                # Group lengths are retired and would be wrong after any change.
                del ds[tag]
                continue
            action = self._action(t, top_level=top_level)
            elem = ds.get_item(tag, keep_deferred=True)
            vr = _vr_of(elem, t)
            if action is Action.REMOVE:
                del ds[tag]
                tally.removed += 1
                tally.private_removed += is_private(t)
                tally.tags.add(t)
            elif action is Action.EMPTY:
                if _is_empty(elem):
                    continue
                ds[tag] = DataElement(t, vr, Sequence() if vr == "SQ" else empty_value_for_VR(vr))
                tally.emptied += 1
                tally.tags.add(t)
            elif action is Action.MAP_UID:
                values = [self.mapper.map(v) for v in _raw_text(ds.get_item(tag))]
                if not values:
                    continue
                ds[tag] = DataElement(t, "UI", values if len(values) > 1 else values[0])
                tally.uids_mapped += 1
                tally.tags.add(t)
            elif vr == "SQ":  # KEEP, DUMMY or RECURSE: the items get the same rules
                for item in ds[tag].value:
                    self._redact(item, tally, top_level=False)
            elif action is Action.DUMMY:
                ds[tag] = DataElement(t, vr, _DUMMY.get(vr, empty_value_for_VR(vr)))
                tally.replaced += 1
                tally.tags.add(t)

    def _mark_deidentified(self, header: Dataset) -> None:
        """PS3.15 E.1.1: say that, and how, the instance was de-identified."""
        header.PatientIdentityRemoved = "YES"
        codes = [_BASIC_PROFILE_CODE]
        method = "PS3.15 Basic Profile"  # LO: at most 64 characters
        if self.spec.retain_dates:
            codes.append(_FULL_DATES_CODE)
            method += ", Retain Full Dates Option"
        header.DeidentificationMethod = method
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        header.DeidentificationMethodCodeSequence = Sequence(items)
        header.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self.spec.retain_dates else "REMOVED"
        )

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _encode(ds: Dataset, layout: Part10Layout) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_implicit_VR = layout.implicit_vr
        buffer.is_little_endian = layout.little_endian
        write_dataset(buffer, ds)
        return buffer.getvalue()


class RedactedInstance:
    """A redacted instance ready to send: ``size`` bytes from ``iter_bytes``/``open``."""

    def __init__(
        self,
        source: Path,
        head: bytes,
        pixel_span: tuple[int, int] | None,
        tail: bytes,
        report: RedactionReport,
        transfer_syntax: str = "",
    ) -> None:
        self.source = source
        #: the transfer syntax of the redacted file (the source's, unless its
        #: encapsulated pixel data was removed: then Explicit VR Little Endian)
        self.transfer_syntax = transfer_syntax
        self._head = head
        self._span = pixel_span
        self._tail = tail
        self.report = report

    @property
    def size(self) -> int:
        """The length of the redacted file, known before any pixel byte is read."""
        pixels = self._span[1] - self._span[0] if self._span else 0
        return len(self._head) + pixels + len(self._tail)

    def iter_bytes(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The redacted file in pieces of at most ``chunk_size`` (after the header)."""
        yield self._head
        if self._span is not None:
            start, end = self._span
            with open(self.source, "rb") as f:
                f.seek(start)
                left = end - start
                while left > 0:
                    piece = f.read(min(chunk_size, left))
                    if not piece:
                        raise RedactionError(f"{self.source} shrank while it was being sent")
                    left -= len(piece)
                    yield piece
        if self._tail:
            yield self._tail

    def write(self, out: BinaryIO) -> RedactionReport:
        for piece in self.iter_bytes():
            out.write(piece)
        return self.report

    def open(self) -> BinaryIO:
        """A readable file object over ``iter_bytes`` with ``len()``: a streaming HTTP body
        (``stow.MultipartBody`` takes it with ``size``). ``seek(0)`` starts it over (a
        request sent again after a 401 re-reads its body from the start)."""
        return _IterReader(self.iter_bytes, self.size)  # type: ignore[return-value]


class _IterReader(io.RawIOBase):
    def __init__(self, pieces: Callable[[], Iterator[bytes]], size: int) -> None:
        self._start = pieces
        self._pieces = pieces()
        self._pending = memoryview(b"")
        self._size = size

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Back to the start only (``seek(0)``); ``tell`` is not offered."""
        if offset != 0 or whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a redacted stream only seeks back to its start")
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()  # the generator closes the source file it has open
        self._pieces = self._start()
        self._pending = memoryview(b"")
        return 0

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._pending = memoryview(piece)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]  # a view: no copy of the rest
        return n
