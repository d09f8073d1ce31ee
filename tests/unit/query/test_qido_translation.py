"""C-FIND/C-MOVE identifiers as QIDO-RS searches, and QIDO-RS answers as identifiers."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from stowaway.receiver.qido_query import (
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    InformationModel,
    Level,
    QueryError,
    instance_ref,
    to_identifier,
    translate,
)

STUDY_ROOT, PATIENT_ROOT = InformationModel.STUDY_ROOT, InformationModel.PATIENT_ROOT


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def params(query: Any, index: int = 0) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in query.searches[index]:
        found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize(
    ("level", "resource"),
    [("STUDY", "studies"), ("SERIES", "series"), ("IMAGE", "instances")],
)
def test_each_level_searches_its_resource(level: str, resource: str) -> None:
    query = translate(identifier(level), STUDY_ROOT)
    assert (query.level.value, query.resource) == (level, resource)


def test_patient_level_searches_studies_and_folds_them_into_patients() -> None:
    query = translate(identifier("PATIENT", PatientID="", PatientName=""), PATIENT_ROOT)
    assert query.resource == "studies"
    first = {"00100020": {"vr": "LO", "Value": ["P1"]}}
    again = {"00100020": {"vr": "LO", "Value": ["P1"]}, "0020000D": {"vr": "UI", "Value": ["9"]}}
    assert query.answer_key(first) == query.answer_key(again) is not None


def test_patient_level_needs_patient_root() -> None:
    with pytest.raises(QueryError) as error:
        translate(identifier("PATIENT", PatientID=""), STUDY_ROOT)
    assert error.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "Patient Root" in str(error.value)


@pytest.mark.parametrize("level", ["", "WORKLIST"])
def test_missing_or_unknown_level_is_refused(level: str) -> None:
    with pytest.raises(QueryError):
        translate(identifier(level), STUDY_ROOT)


def test_values_are_matching_keys_and_empty_keys_are_includefields() -> None:
    query = translate(
        identifier(
            "STUDY",
            PatientID="P1",
            PatientName="Smi*",
            StudyDate="20200101-20201231",
            StudyTime="-1200",
            AccessionNumber="A?1",
            StudyDescription="",
            ModalitiesInStudy="",
        ),
        STUDY_ROOT,
    )
    found = params(query)
    assert found["00100020"] == ["P1"]
    assert found["00100010"] == ["Smi*"]
    assert found["00080020"] == ["20200101-20201231"]
    assert found["00080030"] == ["-1200"]
    assert found["00080050"] == ["A?1"]
    assert {"00081030", "00080061"} <= set(found["includefield"])
    assert "0020000D" in found["includefield"]  # the level's unique key, always


def test_a_lone_asterisk_is_universal_matching() -> None:
    found = params(translate(identifier("STUDY", PatientName="*"), STUDY_ROOT))
    assert "00100010" not in found
    assert "00100010" in found["includefield"]


def test_a_uid_list_becomes_one_search_per_uid_answered_once_each() -> None:
    query = translate(identifier("SERIES", StudyInstanceUID=["1.2", "1.3"]), STUDY_ROOT)
    assert [params(query, i)["0020000D"] for i in range(2)] == [["1.2"], ["1.3"]]
    assert query.dedupe_by is not None


def test_modalities_in_study_list_fans_out_and_repeats_are_folded() -> None:
    query = translate(identifier("STUDY", ModalitiesInStudy=["CT", "MR"]), STUDY_ROOT)
    assert len(query.searches) == 2
    study = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
    assert query.answer_key(study) == ("1.2.3",)


def test_other_multi_valued_keys_are_refused() -> None:
    with pytest.raises(QueryError) as error:
        translate(identifier("STUDY", PatientID=["A", "B"]), STUDY_ROOT)
    assert "PatientID" in str(error.value)


def test_fan_out_is_bounded() -> None:
    many = [f"1.2.{n}" for n in range(11)]
    with pytest.raises(QueryError) as error:
        translate(identifier("IMAGE", SOPInstanceUID=many), STUDY_ROOT, max_searches=10)
    assert error.value.status == OUT_OF_RESOURCES


def test_retrieve_searches_at_image_level_for_the_instance_uids() -> None:
    query = translate(identifier("STUDY", StudyInstanceUID="1.2.3"), STUDY_ROOT, level=Level.IMAGE)
    found = params(query)
    assert query.resource == "instances"
    assert found["0020000D"] == ["1.2.3"]
    assert {"0020000D", "0020000E", "00080018", "00080016"} <= set(found["includefield"])
    result = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
    }
    ref = instance_ref(result)
    assert ref is not None and ref.sop_instance == "1.2.3.4.5"
    assert instance_ref({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}) is None


def test_answer_holds_the_requested_keys_the_level_and_utf8() -> None:
    query = translate(
        identifier(
            "STUDY",
            StudyInstanceUID="1.2.3",
            PatientName="",
            StudyDescription="",
            RetrieveAETitle="",
            PatientID="P*",
        ),
        STUDY_ROOT,
    )
    answer = to_identifier(
        {
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg"}]},
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "00101010": {"vr": "AS", "Value": ["042Y"]},  # not asked for: left out
        },
        query,
        retrieve_aet="GATEWAY",
    )
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert answer.QueryRetrieveLevel == "STUDY"
    assert str(answer.PatientName) == "Müller^Jörg"
    assert answer.PatientID == "P1"
    assert answer.StudyInstanceUID == "1.2.3"  # an exact match: echoed
    assert answer.StudyDescription in (None, "")  # asked for, the store has none: empty
    assert answer.RetrieveAETitle == "GATEWAY"
    assert "PatientAge" not in answer
