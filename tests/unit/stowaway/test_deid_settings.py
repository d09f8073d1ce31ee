"""Redaction and compression settings: Google's flags parsed exactly as Google's adapter
parses them, ``redact:`` and ``transcode:`` in the destinations file, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stowaway.cli import build_parser
from stowaway.destinations import GOOGLE_FLAGS, DestinationConfig, destination_config
from stowaway.forwarder.deidentify import Mode, UidScheme
from stowaway.settings import Settings, SettingsError, load_settings

URL = "http://127.0.0.1:8042/dicom-web"
PATIENT_NAME, PATIENT_ID = 0x00100010, 0x00100020


def settings_for(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return load_settings(build_parser().parse_args(argv), env or {})


def config_for(*flags: str, env: dict[str, str] | None = None) -> DestinationConfig:
    config = destination_config(settings_for(["serve", "--dicomweb_address", URL, *flags], env))
    assert config is not None
    return config


def key_file(tmp_path: Path) -> Path:
    key = tmp_path / "uid.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    return key


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--redact_remove_list=PatientName,00100020"], {}),
        (["--redact_remove_list", "PatientName,00100020"], {}),
        (["--redact-remove-list", "PatientName,00100020"], {}),
        ([], {"STOWAWAY_REDACT_REMOVE_LIST": "PatientName,00100020"}),
    ],
)
def test_googles_remove_list_configures_the_default_destination_with_googles_uids(
    flags: list[str], env: dict[str, str]
) -> None:
    (default,) = config_for(*flags, env=env).destinations
    spec = default.outbound.redaction
    assert spec is not None and spec.mode is Mode.REMOVE_LIST
    assert spec.tags == {PATIENT_NAME, PATIENT_ID}
    assert spec.uid_scheme is UidScheme.GOOGLE
    assert default.outbound.source == GOOGLE_FLAGS


@pytest.mark.parametrize(
    ("value", "tags"),
    [
        ("PatientName,", {PATIENT_NAME}),  # Java's split drops trailing empty pieces
        ("PatientName,,,", {PATIENT_NAME}),
        ("100010", {PATIENT_NAME}),  # Integer.parseInt(s, 16): leading zeros optional
        ("+00100010", {PATIENT_NAME}),
        ("00100010,00100020", {PATIENT_NAME, PATIENT_ID}),
        ("a", {0x0000000A}),  # a hex number, as Google reads it
    ],
)
def test_googles_lists_split_and_parse_as_googles_adapter_does(value: str, tags: set[int]) -> None:
    (default,) = config_for(f"--redact_keep_list={value}").destinations
    spec = default.outbound.redaction
    assert spec is not None and spec.mode is Mode.KEEP_LIST
    assert spec.tags == tags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--redact_remove_list=PatientName, PatientID"],  # no trimming, as Google
            "--redact_remove_list: ' PatientID' is not a DICOM keyword",
        ),
        (["--redact_remove_list=PatientName,,PatientID"], "--redact_remove_list: '' is not"),
        (["--redact_remove_list=PatientNmae"], "(did you mean PatientName?)"),
        (["--redact_keep_list=-10"], "'-10' is a negative number"),
        (["--redact_keep_list=100000000"], "above 7FFFFFFF"),
        (
            ["--redact_remove_list=PatientName", "--redact_filter_profile=CHC_BASIC"],
            "--redact_remove_list and --redact_filter_profile: only one",
        ),
        (["--redact_filter_profile=chc_basic"], "'chc_basic' is not CHC_BASIC or DICOM_BASIC"),
        (["--redact_remove_list=SOPClassUID"], "which the instance needs to stay valid"),
        (
            ["--store_compress_to_transfer_syntax=1.2.840.10008.1.2.4.50"],
            "--store_compress_to_transfer_syntax: JPEG Baseline (Process 1) "
            "(1.2.840.10008.1.2.4.50) is not supported",
        ),
        (
            ["--store_compress_to_transfer_syntax=1.2.840.10008.1.2.4.91"],
            "is lossy: name its quality",
        ),
        (["--store_compress_to_transfer_syntax=1.2.3"], "1.2.3 is not one of"),
        (["--redact-uid-key-file=/x"], "--redact-uid-key-file: has no effect without"),
    ],
)
def test_a_bad_redaction_flag_stops_start_up_with_one_line_naming_it(
    flags: list[str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_for(["serve", "--dicomweb_address", URL, *flags])
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("value", ["CHC_BASIC", "TAG_FILTER_PROFILE_UNSPECIFIED"])
def test_googles_profile_names_select_chc_basic(value: str) -> None:
    (default,) = config_for(f"--redact_filter_profile={value}").destinations
    assert default.outbound.redaction is not None
    assert default.outbound.redaction.mode is Mode.CHC_BASIC


def test_a_uid_key_file_makes_googles_flags_use_keyed_uids(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    (default,) = config_for(
        "--redact_filter_profile=DICOM_BASIC", "--redact-uid-key-file", str(key)
    ).destinations
    spec = default.outbound.redaction
    assert spec is not None and spec.uid_scheme is UidScheme.KEYED and spec.uid_key_file == key


def test_an_unreadable_uid_key_file_stops_start_up_but_not_a_receive_only_process(
    tmp_path: Path,
) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    with pytest.raises(SettingsError, match=r"--redact-uid-key-file: .*holds 4 bytes"):
        settings_for(
            ["serve", "--dicomweb-url", URL, "--redact_filter_profile=CHC_BASIC",
             "--redact-uid-key-file", str(short)]
        )  # fmt: skip
    # a receiver never reads the key (its pod need not mount it)
    settings_for(
        ["receive"],
        {
            "STOWAWAY_DICOMWEB_URL": URL,
            "STOWAWAY_REDACT_FILTER_PROFILE": "CHC_BASIC",
            "STOWAWAY_REDACT_UID_KEY_FILE": str(short),
        },
    )


def test_googles_compression_flag_takes_a_lossless_target() -> None:
    (default,) = config_for(
        "--store_compress_to_transfer_syntax=1.2.840.10008.1.2.4.90"
    ).destinations
    assert default.outbound.redaction is None
    assert default.outbound.transcode is not None
    assert default.outbound.transcode.uid == "1.2.840.10008.1.2.4.90"


def test_googles_flags_apply_to_googles_destination_config_entries_too() -> None:
    google = json.dumps([{"filter": "Modality=MG", "dicomweb_destination": URL + "2"}])
    config = config_for("--destination_config_inline", google, "--redact_filter_profile=CHC_BASIC")
    assert len(config.destinations) == 2
    assert all(d.outbound.redaction is not None for d in config.destinations)


def test_no_flag_no_transform() -> None:
    (default,) = config_for().destinations
    assert not default.outbound.changes_instances
    assert default.outbound.describe() == "as received"


# --- the destinations file -----------------------------------------------------------------


def file_config(tmp_path: Path, entry: str, *flags: str) -> DestinationConfig:
    path = tmp_path / "destinations.yaml"
    path.write_text(
        "destinations:\n"
        f"  - {{name: clinical, kind: dicomweb, url: '{URL}'}}\n"
        f"  - {{name: research, kind: dicomweb, url: '{URL}2', {entry}}}\n"
        "default: clinical\n"
    )
    config = destination_config(settings_for(["serve", "--destinations", str(path), *flags]))
    assert config is not None
    return config


def test_a_file_entry_has_its_own_redaction_and_compression(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    config = file_config(
        tmp_path,
        f"redact: {{profile: DICOM_BASIC, retain_dates: true, uid_key_file: '{key}'}}, "
        "transcode: 1.2.840.10008.1.2.4.80",
    )
    clinical, research = config.by_name("clinical"), config.by_name("research")
    assert not clinical.outbound.changes_instances
    spec = research.outbound.redaction
    assert spec is not None and spec.mode is Mode.DICOM_BASIC and spec.retain_dates
    assert spec.uid_scheme is UidScheme.KEYED
    assert research.outbound.transcode is not None
    assert research.outbound.describe() == (
        "redact DICOM_BASIC+retain_dates (uid keyed), transcode 1.2.840.10008.1.2.4.80"
    )


def test_a_file_entry_never_inherits_googles_flags(tmp_path: Path) -> None:
    config = file_config(tmp_path, "auth: none", "--redact_filter_profile=CHC_BASIC")
    assert not any(d.outbound.changes_instances for d in config.destinations)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("redact: {profile: CHC_BASIC}", "redact: uid_key_file is required for uid_scheme keyed"),
        (
            "redact: {remove: [PatientNmae], uid_scheme: google}",
            "('research'): redact.remove: 'PatientNmae' is not a DICOM keyword, (gggg,eeee) or "
            "8-digit hex tag (did you mean PatientName?)",
        ),
        ("redact: {keep: PatientName, uid_scheme: google}", "redact.keep: must be a list"),
        ("redact: {profile: HIPAA, uid_scheme: google}", "'HIPAA' is not CHC_BASIC or"),
        ("redact: {uid_scheme: google}", "give exactly one of remove, keep or profile"),
        ("redact: {profile: CHC_BASIC, uid_scheme: md5}", "'md5' is not keyed or google"),
        ("redact: CHC_BASIC", "redact: expected a mapping"),
        ("transcode: 1.2.840.10008.1.2.4.50", "is not supported"),
        ("transcode: {syntax: 1.2.840.10008.1.2.4.91}", "is lossy: name its quality"),
    ],
)
def test_a_bad_redaction_entry_is_one_line_naming_the_entry(
    tmp_path: Path, entry: str, message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        file_config(tmp_path, entry)
    text = str(caught.value)
    assert message in text and "destinations[1]" in text, text
    assert "\n" not in text
