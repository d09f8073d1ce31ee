"""Each profile against its table, tag by tag, at the top level and nested in sequences."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from stowaway.forwarder.deidentify import (
    Action,
    RedactionSpec,
    Redactor,
    UidMapper,
    UidScheme,
)
from stowaway.forwarder.deidentify.profiles import (
    MAPPED_UIDS,
    REQUIRED,
    chc_basic_tags,
    dicom_basic,
)
from tests.support.dicom_files import make_ct
from tests.support.phi_instances import (
    PHI_ID,
    PHI_NAME,
    PRIVATE_CREATOR_TAG,
    PRIVATE_TAG,
    make_phi_ct,
)

GOOGLE = UidMapper(UidScheme.GOOGLE)
# A sequence no profile touches, to carry the table's attributes one level down.
CARRIER = "AnatomicRegionSequence"
SAMPLE: dict[str, object] = {
    "AE": "SOMEAE",
    "AS": "045Y",
    "CS": "SOMECODE",
    "DA": "20200101",
    "DS": "1.5",
    "DT": "20200101120000",
    "IS": "7",
    "LO": "Some Long",
    "LT": "Some text",
    "PN": "Doe^John",
    "SH": "Short",
    "ST": "Short text",
    "TM": "120000",
    "UC": "Unlimited",
    "UR": "http://example.invalid/x",
    "UT": "Unlimited text",
    "FL": 1.5,
    "FD": 1.5,
    "SL": 7,
    "SS": 7,
    "SV": 7,
    "UL": 7,
    "US": 7,
    "UV": 7,
    "AT": 0x00100010,
    "OB": b"\x01\x02",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "OW": b"\x01\x02",
    "UN": b"\x01\x02",
}


def table_tags() -> Iterator[int]:
    """Every exact tag of Table E.1-1 that can be put into a dataset, plus one instance of
    each repeating-group row."""
    profile = dicom_basic()
    for tag in profile.exact:
        if tag >> 16 in (0x0000, 0x0002) or tag in REQUIRED or tag == 0xFFFCFFFC:
            continue
        yield tag
    yield from (0x50000010, 0x60003000, 0x60024000)


def vr_for(tag: int) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "LO"


def sample_for(tag: int, vr: str) -> object:
    if vr == "UI":
        return f"1.2.826.0.1.3680043.8.498.{tag}"
    if vr == "SQ":
        item = Dataset()
        item.PatientName = PHI_NAME
        item.CodeMeaning = "kept"
        return Sequence([item])
    return SAMPLE[vr]


def fill(ds: Dataset, tags: list[int]) -> None:
    for tag in tags:
        vr = vr_for(tag)
        ds.add_new(tag, vr, sample_for(tag, vr))


def redacted(path: Path, spec: RedactionSpec) -> Dataset:
    out = io.BytesIO()
    Redactor(spec, GOOGLE).write(path, out)
    return pydicom.dcmread(io.BytesIO(out.getvalue()))


def check(ds: Dataset, tag: int, action: Action, original: Dataset) -> None:
    name = f"{keyword_for_tag(tag) or hex(tag)} ({action.name})"
    if action is Action.REMOVE:
        assert tag not in ds, name
        return
    assert tag in ds, name
    elem, before = ds[tag], original[tag]
    if action is Action.EMPTY:
        assert elem.value in (None, "", b"") or (elem.VR == "SQ" and len(elem.value) == 0), name
    elif action is Action.KEEP:
        assert elem.value == before.value, name
    elif action is Action.MAP_UID:
        assert elem.value == GOOGLE.map(str(before.value)), name
    elif action is Action.DUMMY and elem.VR != "SQ":
        assert elem.value != before.value or elem.value in (None, "", b""), name
    elif action in (Action.DUMMY, Action.RECURSE):
        # kept, with the profile applied inside: the PN in the item is emptied
        assert len(elem.value) == 1 and not elem.value[0].get("PatientName"), name


@pytest.fixture(scope="module")
def table_instance(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    path = make_ct(tmp_path_factory.mktemp("table") / "table.dcm", 4, 4)
    ds = pydicom.dcmread(path)
    tags = list(table_tags())
    fill(ds, tags)
    carrier = Dataset()
    fill(carrier, tags)
    ds.add_new(pydicom.datadict.tag_for_keyword(CARRIER), "SQ", Sequence([carrier]))
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


@pytest.mark.parametrize("retain_dates", [False, True])
def test_dicom_basic_applies_table_e1_1_to_every_listed_tag_at_any_depth(
    table_instance: tuple[Path, Dataset], retain_dates: bool
) -> None:
    path, original = table_instance
    spec = RedactionSpec.from_config(
        {"profile": "DICOM_BASIC", "uid_scheme": "google", "retain_dates": retain_dates}
    )
    out = redacted(path, spec)
    carrier_tag = pydicom.datadict.tag_for_keyword(CARRIER)
    assert spec.action(carrier_tag) is Action.KEEP
    nested, nested_before = out[carrier_tag].value[0], original[carrier_tag].value[0]
    checked = 0
    for tag in table_tags():
        action = dicom_basic().action(tag, retain_dates=retain_dates)
        check(out, tag, action, original)
        check(nested, tag, action, nested_before)
        checked += 1
    assert checked > 400


@pytest.mark.parametrize(
    ("keyword", "action"),
    [
        # Read from PS3.15 Table E.1-1 itself, not from the shipped table.
        ("PatientName", Action.EMPTY),  # Z
        ("PatientID", Action.EMPTY),  # Z
        ("PatientBirthDate", Action.EMPTY),  # Z
        ("PatientAge", Action.REMOVE),  # X
        ("OtherPatientIDsSequence", Action.REMOVE),  # X
        ("InstitutionName", Action.DUMMY),  # X/Z/D
        ("StudyDate", Action.EMPTY),  # Z
        ("AcquisitionDate", Action.EMPTY),  # X/Z
        ("ContentDate", Action.DUMMY),  # Z/D
        ("DeviceSerialNumber", Action.DUMMY),  # X/Z/D
        ("StudyInstanceUID", Action.MAP_UID),  # U
        ("FrameOfReferenceUID", Action.MAP_UID),  # U
        ("ReferencedSOPInstanceUID", Action.MAP_UID),  # U
        ("ReferencedImageSequence", Action.RECURSE),  # X/Z/U*
        ("SOPClassUID", Action.KEEP),  # not listed
        ("Modality", Action.KEEP),
    ],
)
def test_dicom_basic_actions_match_the_standard(keyword: str, action: Action) -> None:
    spec = RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_scheme": "google"})
    assert spec.action(pydicom.datadict.tag_for_keyword(keyword)) is action


@pytest.mark.parametrize(
    ("keyword", "action"),
    [
        ("AcquisitionDate", Action.KEEP),
        ("StudyDate", Action.KEEP),
        ("PatientBirthDate", Action.EMPTY),
    ],
)
def test_retained_dates_keep_the_full_dates_option_column(keyword: str, action: Action) -> None:
    spec = RedactionSpec.from_config(
        {"profile": "DICOM_BASIC", "uid_scheme": "google", "retain_dates": True}
    )
    assert spec.action(pydicom.datadict.tag_for_keyword(keyword)) is action


def test_chc_basic_list_is_googles_286_keywords() -> None:
    from importlib import resources

    text = resources.files("stowaway.forwarder.deidentify").joinpath("chc_basic.txt").read_text()
    keywords = [line for line in text.splitlines() if line and not line.startswith("#")]
    # sha256 of the keywords, one per line, as chc_basic.textproto lists them (commit 74c1807)
    digest = hashlib.sha256(("\n".join(keywords) + "\n").encode()).hexdigest()
    assert digest == "a565b01d5f11981d29c4fd5a18224c732bcb83c43b5f71a26261bad0b0a714c0"
    assert len(keywords) == 286 and len(chc_basic_tags()) == 286


def test_chc_basic_empties_each_listed_tag_at_any_depth_and_maps_uids(tmp_path: Path) -> None:
    path = make_ct(tmp_path / "chc.dcm", 4, 4)
    ds = pydicom.dcmread(path)
    tags = sorted(chc_basic_tags() - REQUIRED)
    fill(ds, tags)
    carrier = Dataset()
    fill(carrier, tags)
    ds.AnatomicRegionSequence = Sequence([carrier])
    ds.add_new(PRIVATE_TAG, "LO", "private")
    ds.save_as(path, enforce_file_format=True)
    original = pydicom.dcmread(path)
    out = redacted(
        path, RedactionSpec.from_config({"profile": "CHC_BASIC", "uid_scheme": "google"})
    )
    nested, nested_before = out.AnatomicRegionSequence[0], original.AnatomicRegionSequence[0]
    for tag in tags:
        # Google's list also names UIDs (FrameOfReferenceUID, ...): those are mapped instead
        action = Action.MAP_UID if tag in MAPPED_UIDS else Action.EMPTY
        if tag == 0xFFFCFFFC:  # DataSetTrailingPadding: always dropped, it may hold anything
            action = Action.REMOVE
        check(out, tag, action, original)
        check(nested, tag, action, nested_before)
    assert out[PRIVATE_TAG].value == "private"  # CHC_BASIC keeps private tags, as Google's does
    assert out.Modality == "CT" and out.PixelData == original.PixelData


@pytest.mark.parametrize("implicit", [False, True])
def test_dicom_basic_removes_identifying_data_from_a_realistic_instance(
    tmp_path: Path, implicit: bool
) -> None:
    path = make_phi_ct(tmp_path / "phi.dcm", implicit=implicit)
    original = pydicom.dcmread(path)
    out = redacted(
        path, RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_scheme": "google"})
    )
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PatientName == "" and out.PatientID == "" and out.PatientBirthDate == ""
    assert "PatientAge" not in out and "OtherPatientIDsSequence" not in out
    assert "InstitutionAddress" not in out
    assert out.InstitutionName == "ANONYMIZED" and out.OperatorsName == "ANONYMIZED"
    # private creator, private element and private sequence: all gone
    assert PRIVATE_CREATOR_TAG not in out and PRIVATE_TAG not in out and 0x00091002 not in out
    assert "DataSetTrailingPadding" not in out
    # nested: two levels down, and in a kept sequence
    assert out.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].PersonName == "ANONYMIZED"
    assert out.AnatomicRegionSequence[0].PatientID == ""
    assert out.AnatomicRegionSequence[0].StudyDate == ""
    assert out.ReferencedSeriesSequence[0].SeriesInstanceUID == out.SeriesInstanceUID
    # references follow the mapped SOP Instance UID
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPInstanceUID == GOOGLE.map(original.SOPInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.FrameOfReferenceUID == GOOGLE.map(original.FrameOfReferenceUID)
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.PixelData == original.PixelData
    text = repr(out) + repr(out.file_meta)
    assert PHI_NAME not in text and PHI_ID not in text and "General Hospital" not in text


def test_keep_list_keeps_listed_and_required_elements_only(tmp_path: Path) -> None:
    path = make_phi_ct(tmp_path / "phi.dcm")
    original = pydicom.dcmread(path)
    spec = RedactionSpec.from_config(
        {"keep": ["PatientSex", "ReferencedImageSequence"], "uid_scheme": "google"}
    )
    out = redacted(path, spec)
    present = {int(e.tag) for e in out}
    listed = {0x00100040, 0x00081140}
    assert present - listed - REQUIRED - MAPPED_UIDS == set()
    for tag in REQUIRED & {int(e.tag) for e in original}:
        assert tag in out, keyword_for_tag(tag)
    assert out.PatientSex == original.PatientSex
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPInstanceUID == GOOGLE.map(original.SOPInstanceUID)
    assert out.PixelData == original.PixelData and out.Rows == original.Rows


def test_remove_list_empties_at_any_depth_and_never_empties_uids(tmp_path: Path) -> None:
    path = make_phi_ct(tmp_path / "phi.dcm")
    original = pydicom.dcmread(path)
    spec = RedactionSpec.from_google_flags(
        remove_list="PatientName,PatientID,StudyInstanceUID", uid_scheme=UidScheme.GOOGLE
    )
    assert spec is not None
    out = redacted(path, spec)
    assert out.PatientName == "" and out.PatientID == ""
    assert out.ReferencedSeriesSequence[0].PatientName == ""  # Google leaves this one
    assert out.AnatomicRegionSequence[0].PatientID == ""
    assert out.StudyInstanceUID == GOOGLE.map(original.StudyInstanceUID)
    assert out.InstitutionName == "General Hospital"  # not listed: kept
    assert out[PRIVATE_TAG].value == original[PRIVATE_TAG].value


def test_remove_list_naming_pixel_data_empties_it_as_google_does(tmp_path: Path) -> None:
    path = make_ct(tmp_path / "ct.dcm", 4, 4)
    spec = RedactionSpec.from_google_flags(remove_list="PixelData", uid_scheme=UidScheme.GOOGLE)
    assert spec is not None
    out = redacted(path, spec)
    assert "PixelData" in out and not out.PixelData


def test_report_counts_what_was_done_and_holds_no_values(tmp_path: Path) -> None:
    path = make_phi_ct(tmp_path / "phi.dcm")
    spec = RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_scheme": "google"})
    report = Redactor(spec, GOOGLE).write(path, io.BytesIO())
    assert report.profile == "DICOM_BASIC" and report.uid_scheme == "google"
    assert report.private_removed == 3 and report.removed >= 3
    assert report.emptied > 0 and report.replaced > 0 and report.uids_mapped >= 4
    assert "(0010,0010)" in report.tags
    text = repr(report.as_dict())
    assert PHI_NAME not in text and PHI_ID not in text
