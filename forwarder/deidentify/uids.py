"""Replacement UIDs: the same original always gives the same new UID.

Two schemes, both in the ``2.25.`` root (a UUID written as a decimal integer, PS3.5 B.2):

* ``keyed`` (the default): HMAC-SHA256 of the original UID under a secret key, its first
  128 bits made a version-8 (custom) UUID. Without the key nobody can confirm a guessed
  original; with it, an operator can recompute the mapping of any UID they hold.
* ``google``: exactly what Google's import adapter writes (its ``DicomRedactor`` calls
  dcm4che's ``UIDUtils.createNameBasedUID``): the MD5 name-based (version 3) UUID of the
  original UID's bytes, no namespace, no key. Anyone who can guess an original UID can
  confirm it; it exists for a store that Google's adapter filled and that must keep
  deduplicating re-sends.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from pathlib import Path

__all__ = ["MIN_KEY_BYTES", "UidKeyError", "UidMapper", "UidScheme", "google_uid", "keyed_uid"]

UUID_ROOT = "2.25."
MIN_KEY_BYTES = 16


class UidScheme(enum.Enum):
    KEYED = "keyed"
    GOOGLE = "google"


class UidKeyError(ValueError):
    """The UID key file is missing, unreadable or too short (the message never holds the key)."""


def _uuid_decimal(digest16: bytearray, version: int) -> str:
    digest16[6] = (digest16[6] & 0x0F) | (version << 4)
    digest16[8] = (digest16[8] & 0x3F) | 0x80  # RFC 4122 variant
    return UUID_ROOT + str(int.from_bytes(digest16, "big"))


def _dcm4che_trim(value: str) -> str:
    # dcm4che's getString trims every character <= U+0020 at both ends (NUL padding included).
    start, end = 0, len(value)
    while start < end and value[start] <= " ":
        start += 1
    while end > start and value[end - 1] <= " ":
        end -= 1
    return value[start:end]


def google_uid(original: str) -> str:
    """Google's replacement for ``original``: ``2.25.`` + the MD5 v3 UUID of its bytes."""
    name = _dcm4che_trim(original).encode("utf-8")
    return _uuid_decimal(bytearray(hashlib.md5(name).digest()), 3)


def keyed_uid(original: str, key: bytes) -> str:
    """``2.25.`` + the version-8 UUID made of HMAC-SHA256(key, original)[:16] (<= 44 chars)."""
    name = original.strip("\0 ").encode("ascii", "replace")
    digest = hmac.new(key, name, hashlib.sha256).digest()
    return _uuid_decimal(bytearray(digest[:16]), 8)


class UidMapper:
    """Maps one UID value to its replacement under one scheme. Holds the key; never shows it."""

    def __init__(self, scheme: UidScheme, key: bytes | None = None) -> None:
        if scheme is UidScheme.KEYED and (key is None or len(key) < MIN_KEY_BYTES):
            raise UidKeyError(f"the keyed UID scheme needs a key of at least {MIN_KEY_BYTES} bytes")
        self.scheme = scheme
        self._key = key

    @classmethod
    def from_key_file(cls, path: Path) -> UidMapper:
        """The keyed scheme with the key in ``path`` (trailing newline and spaces ignored)."""
        try:
            key = path.read_bytes().rstrip(b"\r\n \t")
        except OSError as exc:
            raise UidKeyError(f"cannot read the UID key file {path}: {exc.strerror}") from None
        if len(key) < MIN_KEY_BYTES:
            raise UidKeyError(
                f"the UID key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} needed"
            )
        return cls(UidScheme.KEYED, key)

    def __repr__(self) -> str:
        return f"UidMapper({self.scheme.value})"

    def map(self, original: str) -> str:
        """The replacement of one UID value; an empty value stays empty."""
        if not original.strip("\0 "):
            return ""
        if self.scheme is UidScheme.GOOGLE:
            return google_uid(original)
        assert self._key is not None
        return keyed_uid(original, self._key)
