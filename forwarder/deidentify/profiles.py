"""The redaction profiles as data: which action each tag gets.

Two tables ship beside this module (package data):

* ``chc_basic.txt``: Google's CHC_BASIC profile, the 286 keywords of ``chc_basic.textproto``
  in GoogleCloudPlatform/healthcare-dicom-dicomweb-adapter (commit 74c1807,
  ``third_party/deid-redactor/lib/src/main/resources/chc_basic.textproto``, Apache 2.0).
* ``dicom_basic.tsv``: DICOM PS3.15 Annex E Table E.1-1, the Basic Application Level
  Confidentiality Profile action of each attribute and its action under the Retain
  Longitudinal Temporal Information with Full Dates Option.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache
from importlib import resources

from pydicom.datadict import keyword_dict

__all__ = [
    "MAPPED_UIDS",
    "REQUIRED",
    "Action",
    "BasicProfile",
    "chc_basic_tags",
    "dicom_basic",
    "is_private",
]


class Action(enum.Enum):
    """What happens to one element."""

    KEEP = "keep"
    REMOVE = "remove"  # the element is gone
    EMPTY = "empty"  # present, zero length (a sequence: no items)
    DUMMY = "dummy"  # present, a fixed non-identifying value of its VR
    MAP_UID = "map_uid"  # every value replaced by its mapped UID
    RECURSE = "recurse"  # a sequence kept, its items redacted by the same rules


def _tag(keyword: str) -> int:
    return int(keyword_dict[keyword])


# What a keep list never drops: an instance without these is not a valid, displayable
# instance of its SOP class (identity, character set for its text, the Image Pixel module
# and the pixel data in any of its forms).
REQUIRED: frozenset[int] = frozenset(
    _tag(k)
    for k in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "FrameIncrementPointer",
        "PixelAspectRatio",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "ICCProfile",
        "ColorSpace",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "PixelData",
    )
)

# The identifying UIDs that are always replaced by their mapped value, at any depth and in
# every mode (the Annex E rows with action U, group 0002 and the command group aside):
# instances, series, studies, frames of reference and everything that refers to them.
# Class UIDs (SOPClassUID, ReferencedSOPClassUID, TransferSyntaxUID...) are never mapped.
MAPPED_UIDS: frozenset[int]  # set below from the table

MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
DATA_SET_TRAILING_PADDING = 0xFFFCFFFC


def is_private(tag: int) -> bool:
    """Odd group: a private data element or private creator."""
    return bool((tag >> 16) & 1)


@cache
def chc_basic_tags() -> frozenset[int]:
    """The tags of Google's CHC_BASIC profile (each one emptied by it)."""
    text = resources.files(__package__).joinpath("chc_basic.txt").read_text("ascii")
    keywords = [line for line in text.splitlines() if line and not line.startswith("#")]
    return frozenset(_tag(k) for k in keywords)


# Where Table E.1-1 gives a choice, the action that keeps the element present wins: the
# de-identifier cannot know whether the attribute is Type 1, 2 or 3 in the instance's IOD,
# and a present element is valid for all three (PS3.15 E.3.1 defines the choices).
_TABLE_ACTIONS = {
    "X": Action.REMOVE,
    "Z": Action.EMPTY,
    "D": Action.DUMMY,
    "U": Action.MAP_UID,
    "K": Action.KEEP,
    "X/Z": Action.EMPTY,
    "X/D": Action.DUMMY,
    "Z/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "X/Z/U*": Action.RECURSE,
}


@dataclass(frozen=True)
class _Row:
    basic: Action
    full_dates: Action | None
    keyword: str


@dataclass(frozen=True)
class BasicProfile:
    """Table E.1-1: exact tags, and repeating-group rows (``50xx,xxxx``) as masks."""

    exact: dict[int, _Row]
    masked: tuple[tuple[int, int, _Row], ...]  # (mask, value, row)

    def row(self, tag: int) -> _Row | None:
        if (found := self.exact.get(tag)) is not None:
            return found
        for mask, value, masked_row in self.masked:
            if tag & mask == value:
                return masked_row
        return None

    def action(self, tag: int, *, retain_dates: bool) -> Action:
        """The action for ``tag`` (KEEP for attributes the table does not list)."""
        if is_private(tag):
            return Action.REMOVE
        found = self.row(tag)
        if found is None:
            return Action.KEEP
        if retain_dates and found.full_dates is not None:
            return found.full_dates
        return found.basic


def _parse_table_tag(text: str) -> tuple[int, int]:
    """``(50xx,xxxx)`` as (mask, value): an ``x`` digit matches anything."""
    digits = text[1:5] + text[6:10]
    mask = value = 0
    for ch in digits:
        mask <<= 4
        value <<= 4
        if ch.lower() != "x":
            mask |= 0xF
            value |= int(ch, 16)
    return mask, value


@cache
def dicom_basic() -> BasicProfile:
    """Table E.1-1 as shipped in ``dicom_basic.tsv``."""
    text = resources.files(__package__).joinpath("dicom_basic.tsv").read_text("ascii")
    exact: dict[int, _Row] = {}
    masked: list[tuple[int, int, _Row]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        tag_text, basic, full_dates, keyword = line.split("\t")
        row = _Row(
            _TABLE_ACTIONS[basic], _TABLE_ACTIONS[full_dates] if full_dates else None, keyword
        )
        mask, value = _parse_table_tag(tag_text)
        if mask == 0xFFFFFFFF:
            exact[value] = row
        else:
            masked.append((mask, value, row))
    return BasicProfile(exact, tuple(masked))


def _mapped_uids() -> frozenset[int]:
    return frozenset(
        tag
        for tag, row in dicom_basic().exact.items()
        if row.basic is Action.MAP_UID and tag >> 16 not in (0x0000, 0x0002)
    )


MAPPED_UIDS = _mapped_uids()
