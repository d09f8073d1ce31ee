"""Replacement UIDs: deterministic, valid, keyed; the google scheme is Google's exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stowaway.forwarder.deidentify import UidKeyError, UidMapper, UidScheme
from stowaway.forwarder.deidentify.uids import google_uid, keyed_uid

KEY = b"k" * 32
UID_SYNTAX = re.compile(r"2\.25\.[1-9][0-9]*")


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        # The expected values of Google's DicomRedactorTest (removelistReplaceUIDDefault).
        ("1.2.3", "2.25.235153174557024093797895412215599142974"),
        ("1.2.4", "2.25.11567562993222170604478667374799402574"),
        ("1.2.5", "2.25.291421206658433162738860295383136573243"),
    ],
)
def test_google_scheme_reproduces_googles_redactor(original: str, expected: str) -> None:
    assert google_uid(original) == expected
    assert UidMapper(UidScheme.GOOGLE).map(original) == expected


def test_google_scheme_ignores_padding_like_dcm4che() -> None:
    """dcm4che's getString trims the NUL/space padding of a UI value before hashing."""
    assert google_uid("1.2.3\0") == google_uid(" 1.2.3 ") == google_uid("1.2.3")


@pytest.mark.parametrize("scheme", list(UidScheme))
def test_replacement_uids_are_valid_2_25_uids_within_64_chars(scheme: UidScheme) -> None:
    mapper = UidMapper(scheme, KEY)
    for n in range(200):
        new = mapper.map(f"1.2.826.0.1.3680043.8.498.{n}" + "9" * 30)
        assert UID_SYNTAX.fullmatch(new), new
        assert len(new) <= 64


def test_keyed_uids_are_deterministic_and_depend_on_the_key() -> None:
    original = "1.2.840.113619.2.55.3.1234"
    assert keyed_uid(original, KEY) == keyed_uid(original, KEY)
    assert keyed_uid(original, KEY) != keyed_uid(original, b"j" * 32)
    assert keyed_uid(original, KEY) != keyed_uid(original + "1", KEY)
    assert keyed_uid(original, KEY) != google_uid(original)


def test_keyed_uid_is_a_version_8_uuid() -> None:
    value = int(keyed_uid("1.2.3", KEY)[len("2.25.") :])
    assert (value >> 76) & 0xF == 8  # version nibble
    assert (value >> 62) & 0x3 == 0b10  # RFC 4122 variant


def test_empty_uid_stays_empty() -> None:
    assert UidMapper(UidScheme.KEYED, KEY).map("") == ""
    assert UidMapper(UidScheme.GOOGLE).map("\0") == ""


def test_key_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "uid.key"
    path.write_bytes(KEY + b"\n")
    assert UidMapper.from_key_file(path).map("1.2.3") == keyed_uid("1.2.3", KEY)


def test_short_or_missing_key_file_fails_without_showing_the_key(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"secret-7")
    with pytest.raises(UidKeyError) as caught:
        UidMapper.from_key_file(short)
    assert "holds 8 bytes; at least 16" in str(caught.value)
    assert "secret" not in str(caught.value)
    with pytest.raises(UidKeyError, match="cannot read the UID key file"):
        UidMapper.from_key_file(tmp_path / "missing.key")


def test_mapper_repr_never_shows_the_key() -> None:
    assert "k" * 16 not in repr(UidMapper(UidScheme.KEYED, KEY))
