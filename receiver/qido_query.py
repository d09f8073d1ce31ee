"""C-FIND and C-MOVE/C-GET identifiers as QIDO-RS searches, and QIDO-RS answers as identifiers.

Pure functions, no I/O. The rules (PS3.4 C.2.2.2 matching, PS3.18 8.3.4 QIDO-RS):

* The Query/Retrieve level picks the resource: PATIENT (Patient Root only) and STUDY
  search ``studies``, SERIES ``series``, IMAGE ``instances``.
* A key with a value is a matching key, sent as ``{tag}={value}``: single values,
  ``*``/``?`` wildcards and ``-`` date/time ranges mean the same in both. A value of only
  ``*`` is universal matching, the same as an empty key.
* A key without a value is a return key, asked for with ``includefield``.
* A list of UIDs, or of ModalitiesInStudy, becomes one search per value (QIDO-RS UID lists
  are not supported by every store); the answers are then told apart by the level's
  unique key, so a study of two matching modalities is answered once. At PATIENT level
  the studies found are folded into patients the same way (by PatientID and its issuer).
* The answer holds every key the identifier asked for, in its order, empty when the store
  has no value, with the QueryRetrieveLevel; text is UTF-8 (ISO_IR 192), as DICOM JSON is.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from stowaway.dicomweb.client import INSTANCES, SERIES, STUDIES

#: C-FIND/C-MOVE/C-GET statuses for identifiers we cannot serve (PS3.4 C.4.1.1.4).
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
OUT_OF_RESOURCES: Final = 0xA700

QUERY_RETRIEVE_LEVEL: Final = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET: Final = Tag(0x0008, 0x0005)
RETRIEVE_AE_TITLE: Final = Tag(0x0008, 0x0054)
MODALITIES_IN_STUDY: Final = Tag(0x0008, 0x0061)
PATIENT_ID: Final = Tag(0x0010, 0x0020)
ISSUER_OF_PATIENT_ID: Final = Tag(0x0010, 0x0021)
STUDY_INSTANCE_UID: Final = Tag(0x0020, 0x000D)
SERIES_INSTANCE_UID: Final = Tag(0x0020, 0x000E)
SOP_INSTANCE_UID: Final = Tag(0x0008, 0x0018)
SOP_CLASS_UID: Final = Tag(0x0008, 0x0016)

#: Keys that say how to query, not what to match.
_CONTROL_KEYS: Final = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET})
#: Multi-valued keys answered by one search per value.
_LIST_KEYS_OF_VR: Final = frozenset({"UI"})
_LIST_KEYS: Final = frozenset({MODALITIES_IN_STUDY})
#: What an instance reference for a retrieve needs from the store.
_INSTANCE_KEYS: Final = (STUDY_INSTANCE_UID, SERIES_INSTANCE_UID, SOP_INSTANCE_UID, SOP_CLASS_UID)
#: DICOM JSON text is Unicode: answers say so.
UTF8: Final = "ISO_IR 192"


class InformationModel(enum.StrEnum):
    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"


class Level(enum.StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


_RESOURCE: Final = {
    Level.PATIENT: STUDIES,
    Level.STUDY: STUDIES,
    Level.SERIES: SERIES,
    Level.IMAGE: INSTANCES,
}
#: What tells two answers of a level apart.
_UNIQUE_KEYS: Final = {
    Level.PATIENT: (PATIENT_ID, ISSUER_OF_PATIENT_ID),
    Level.STUDY: (STUDY_INSTANCE_UID,),
    Level.SERIES: (SERIES_INSTANCE_UID,),
    Level.IMAGE: (SOP_INSTANCE_UID,),
}


class QueryError(ValueError):
    """An identifier that cannot be served; ``status`` is the DIMSE failure to answer."""

    def __init__(self, message: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReturnKey:
    """A key the identifier asked for, with the value to echo when the store has none."""

    tag: BaseTag
    vr: str
    echo: Any = None


@dataclass(frozen=True)
class QidoQuery:
    """An identifier as QIDO-RS searches: ``searches`` holds one parameter list per search."""

    level: Level
    resource: str
    searches: tuple[tuple[tuple[str, str], ...], ...]
    return_keys: tuple[ReturnKey, ...]
    #: Tags whose values identify an answer, when answers may repeat; else None.
    dedupe_by: tuple[BaseTag, ...] | None

    def answer_key(self, result: Mapping[str, Any]) -> tuple[str, ...] | None:
        """What identifies ``result`` among the answers (None: answers cannot repeat)."""
        if self.dedupe_by is None:
            return None
        return tuple(json_value(result, tag) or "" for tag in self.dedupe_by)


@dataclass(frozen=True)
class InstanceRef:
    """One instance a retrieve will fetch."""

    study: str
    series: str
    sop_instance: str
    sop_class: str


def hex_tag(tag: BaseTag) -> str:
    return f"{int(tag):08X}"


def level_of(identifier: Dataset, model: InformationModel) -> Level:
    """The identifier's QueryRetrieveLevel, checked against the information model."""
    element = identifier.get(QUERY_RETRIEVE_LEVEL)
    text = str(element.value or "").strip().upper() if element is not None else ""
    if not text:
        raise QueryError("QueryRetrieveLevel (0008,0052) is missing")
    try:
        level = Level(text)
    except ValueError:
        raise QueryError(
            f"QueryRetrieveLevel {text[:16]!r} is not PATIENT, STUDY, SERIES or IMAGE"
        ) from None
    if level is Level.PATIENT and model is InformationModel.STUDY_ROOT:
        raise QueryError("PATIENT level needs the Patient Root information model")
    return level


def translate(
    identifier: Dataset,
    model: InformationModel,
    *,
    level: Level | None = None,
    max_searches: int = 1000,
) -> QidoQuery:
    """The QIDO-RS searches for ``identifier`` (at ``level``, default its own)."""
    level = level or level_of(identifier, model)
    matches: list[tuple[str, list[str]]] = []
    return_keys: list[ReturnKey] = []
    includes: list[str] = []
    fans_out = False
    for element in identifier:
        tag = element.tag
        if tag in _CONTROL_KEYS or tag.is_private or tag.group in (0x0000, 0x0002):
            continue
        values = _values(element)
        echo = None
        if element.VR == "SQ" or not values:
            includes.append(hex_tag(tag))
        else:
            if len(values) > 1:
                if element.VR not in _LIST_KEYS_OF_VR and tag not in _LIST_KEYS:
                    raise QueryError(
                        f"{element.keyword or hex_tag(tag)} has {len(values)} values: only UIDs "
                        "and ModalitiesInStudy may hold a list"
                    )
                fans_out = True
            elif not _is_pattern(values[0], element.VR):
                echo = element.value  # an exact match: the store's value is this one
            matches.append((hex_tag(tag), values))
        return_keys.append(ReturnKey(tag, element.VR, echo))
    unique = _UNIQUE_KEYS[level]
    needed = list(_INSTANCE_KEYS) if level is Level.IMAGE else list(unique)
    includes.extend(hex_tag(t) for t in needed if hex_tag(t) not in includes)
    combinations = 1
    for _, values in matches:
        combinations *= len(values)
    if combinations > max_searches:
        raise QueryError(
            f"the identifier's value lists make {combinations} searches, more than {max_searches}",
            OUT_OF_RESOURCES,
        )
    searches = tuple(
        tuple(zip((key for key, _ in matches), chosen, strict=True))
        + tuple(("includefield", field) for field in includes)
        for chosen in itertools.product(*(values for _, values in matches))
    )
    dedupe = unique if (fans_out or level is Level.PATIENT) else None
    return QidoQuery(level, _RESOURCE[level], searches, tuple(return_keys), dedupe)


def _is_pattern(text: str, vr: str) -> bool:
    """A wildcard or a range: what matches is not the text itself."""
    return any(c in text for c in "*?") or (vr in ("DA", "TM", "DT") and "-" in text)


def _values(element: DataElement) -> list[str]:
    """The element's values as query text; [] for an empty key or universal matching."""
    value = element.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    texts = [str(item).strip() for item in items]
    texts = [text for text in texts if text]
    if texts == ["*"]:
        return []
    return texts


def json_value(result: Mapping[str, Any], tag: BaseTag) -> str | None:
    """The first value of ``tag`` in a DICOM JSON object, as text (None if absent)."""
    element = result.get(hex_tag(tag))
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    first = values[0]
    if isinstance(first, Mapping):  # a person name
        return str(first.get("Alphabetic", ""))
    return str(first)


def to_identifier(
    result: Mapping[str, Any], query: QidoQuery, *, retrieve_aet: str | None = None
) -> Dataset:
    """The C-FIND response identifier for one QIDO-RS answer."""
    answer = Dataset()
    answer.SpecificCharacterSet = UTF8
    for key in query.return_keys:
        element = _element_from_json(result, key)
        if key.tag == RETRIEVE_AE_TITLE and retrieve_aet:
            element = DataElement(key.tag, "AE", retrieve_aet)
        answer.add(element)
    answer.QueryRetrieveLevel = query.level.value
    return answer


def _element_from_json(result: Mapping[str, Any], key: ReturnKey) -> DataElement:
    found = result.get(hex_tag(key.tag))
    if (
        isinstance(found, dict)
        and "Value" in found
        and "BulkDataURI" not in found
        and "InlineBinary" not in found
    ):
        try:
            decoded = Dataset.from_json({hex_tag(key.tag): found})
            return decoded[key.tag]
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # a malformed element: answered empty rather than failing the query
    return DataElement(key.tag, key.vr, key.echo)


def instance_ref(result: Mapping[str, Any]) -> InstanceRef | None:
    """The instance an IMAGE-level answer names, or None if it lacks one of its UIDs."""
    values = [json_value(result, tag) for tag in _INSTANCE_KEYS]
    if not all(values):
        return None
    study, series, sop, sop_class = (str(v) for v in values)
    return InstanceRef(study, series, sop, sop_class)
