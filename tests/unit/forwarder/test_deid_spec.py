"""Redaction settings: Google's flag syntax read exactly as its adapter reads it, our own
``redact`` mapping, and one-line errors for settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowaway.forwarder.deidentify import Mode, RedactionConfigError, RedactionSpec, UidScheme
from stowaway.forwarder.deidentify.tags import parse_tag, split_google_list

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
KEY = Path("/nonexistent/key")  # specs only name the file; the Redactor reads it


def google(**flags: str) -> RedactionSpec | None:
    return RedactionSpec.from_google_flags(**flags, uid_scheme=UidScheme.GOOGLE)


@pytest.mark.parametrize(
    ("value", "pieces"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("a,b,", ["a", "b"]),  # Java drops trailing empty strings
        ("a,b,,,", ["a", "b"]),
        (",", []),
        ("a,,b", ["a", "", "b"]),  # ...but not inner ones
        (",a", ["", "a"]),  # ...nor a leading one
        (" a , b", [" a ", " b"]),  # no trimming
    ],
)
def test_google_lists_split_like_java_string_split(value: str, pieces: list[str]) -> None:
    assert split_google_list(value) == pieces


def test_google_remove_list_takes_keywords_and_hex_tags() -> None:
    spec = google(remove_list="PatientName,00100020")
    assert spec is not None
    assert spec.mode is Mode.REMOVE_LIST
    assert spec.tags == {PATIENT_NAME, PATIENT_ID}


@pytest.mark.parametrize("token", ["100010", "+00100010", "00100010", "0000100010"])
def test_google_hex_tags_parse_like_java_parse_int(token: str) -> None:
    """Google reads a non-keyword with Integer.parseInt(s, 16): short and signed forms work."""
    spec = google(remove_list=token)
    assert spec is not None and spec.tags == {PATIENT_NAME}


def test_google_keep_list_trailing_comma_is_accepted() -> None:
    spec = google(keep_list="PatientName,")
    assert spec is not None and spec.mode is Mode.KEEP_LIST and spec.tags == {PATIENT_NAME}


def test_google_remove_list_of_only_commas_removes_nothing() -> None:
    """Java's split gives no piece at all: Google then only replaces the UIDs."""
    spec = google(remove_list=",,")
    assert spec is not None and spec.mode is Mode.REMOVE_LIST and spec.tags == frozenset()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"remove_list": "PatientName, PatientID"}, "' PatientID' is not a DICOM keyword"),
        ({"remove_list": "a,,b"}, "'' is not a DICOM keyword"),  # "a" is hex for 0000000A
        ({"remove_list": "PatientName,,PatientID"}, "'' is not a DICOM keyword"),
        ({"remove_list": "patientname"}, "did you mean PatientName?"),
        ({"remove_list": "(0010,0010)"}, "'(0010' is not a DICOM keyword"),
        ({"remove_list": "FFFEE000"}, "above 7FFFFFFF"),
        ({"remove_list": "-1"}, "negative"),
        ({"remove_list": "PatientName", "keep_list": "PatientID"}, "only one of the redact"),
        ({"filter_profile": "chc_basic"}, "is not CHC_BASIC or DICOM_BASIC"),
        ({"remove_list": "Rows"}, "(0028,0010), which the instance needs"),
    ],
)
def test_bad_google_flags_fail_with_one_line_naming_the_flag(
    flags: dict[str, str], message: str
) -> None:
    with pytest.raises(RedactionConfigError) as caught:
        google(**flags)
    text = str(caught.value)
    assert message in text
    assert text.startswith("--redact_")
    assert "\n" not in text


def test_google_profile_names() -> None:
    assert google(filter_profile="CHC_BASIC") == google(
        filter_profile="TAG_FILTER_PROFILE_UNSPECIFIED"
    )
    chc = google(filter_profile="CHC_BASIC")
    assert chc is not None and chc.mode is Mode.CHC_BASIC
    assert google() is None


def test_google_remove_list_may_name_the_uids_and_pixel_data() -> None:
    """Google maps listed UIDs instead of emptying them and may empty PixelData: both load."""
    spec = google(remove_list="SOPInstanceUID,StudyInstanceUID,PixelData")
    assert spec is not None


@pytest.mark.parametrize(
    ("token", "tag"),
    [
        ("PatientName", PATIENT_NAME),
        ("(0010,0010)", PATIENT_NAME),
        ("00100010", PATIENT_NAME),
        ("(7fe0,0010)", 0x7FE00010),
    ],
)
def test_config_tags_by_keyword_or_group_element(token: str, tag: int) -> None:
    assert parse_tag(token) == tag


def test_config_profile_with_retained_dates() -> None:
    spec = RedactionSpec.from_config(
        {"profile": "DICOM_BASIC", "retain_dates": True, "uid_key_file": str(KEY)}
    )
    assert spec.mode is Mode.DICOM_BASIC and spec.retain_dates
    assert spec.uid_scheme is UidScheme.KEYED and spec.uid_key_file == KEY
    assert spec.name == "DICOM_BASIC+retain_dates"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"profile": "DICOM_BASIC"}, "redact: uid_key_file is required"),
        ({"profile": "HIPAA", "uid_scheme": "google"}, "redact.profile: 'HIPAA' is not"),
        ({"remove": ["PatientNmae"], "uid_scheme": "google"}, "did you mean PatientName?"),
        ({"remove": "PatientName", "uid_scheme": "google"}, "must be a list"),
        ({"keep": [], "remove": [], "uid_scheme": "google"}, "exactly one of"),
        ({"profile": "CHC_BASIC", "retain_dates": True, "uid_scheme": "google"}, "DICOM_BASIC"),
        ({"profile": "CHC_BASIC", "uid_scheme": "md5"}, "'md5' is not keyed or google"),
        ({"profile": "CHC_BASIC", "uid_scheme": "google", "retain_uids": True}, "unknown"),
        ({"remove": ["SOPClassUID"], "uid_scheme": "google"}, "which the instance needs"),
    ],
)
def test_bad_redact_config_fails_with_one_line(config: dict[str, object], message: str) -> None:
    with pytest.raises(RedactionConfigError) as caught:
        RedactionSpec.from_config(config)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_google_flags_default_to_googles_uids_so_a_google_command_line_works() -> None:
    spec = RedactionSpec.from_google_flags(filter_profile="CHC_BASIC")
    assert spec is not None and spec.uid_scheme is UidScheme.GOOGLE
    keyed = RedactionSpec.from_google_flags(
        filter_profile="CHC_BASIC", uid_scheme=UidScheme.KEYED, uid_key_file=KEY
    )
    assert keyed is not None and keyed.uid_scheme is UidScheme.KEYED
