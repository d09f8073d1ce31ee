"""Naming DICOM tags in configuration: keywords, ``(gggg,eeee)``, and Google's flag syntax."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from pydicom.datadict import keyword_dict

__all__ = [
    "TagError",
    "format_tag",
    "parse_google_tag",
    "parse_tag",
    "parse_tags",
    "split_google_list",
]

_PAREN_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
# What Java's Integer.parseInt(s, 16) accepts: an optional sign, then hex digits.
_JAVA_HEX_INT = re.compile(r"[+-]?[0-9A-Fa-f]+")
_INT_MAX = 0x7FFFFFFF


class TagError(ValueError):
    """A tag name in the configuration that names no DICOM tag (one line, says which)."""


def format_tag(tag: int) -> str:
    """``(gggg,eeee)`` in upper-case hex, as reports and errors show a tag."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _unknown(token: str, where: str) -> TagError:
    close = difflib.get_close_matches(token, keyword_dict.keys(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return TagError(
        f"{where}: {token!r} is not a DICOM keyword, (gggg,eeee) or 8-digit hex tag{hint}"
    )


def parse_tag(token: str, where: str = "redact") -> int:
    """A tag from a keyword (``PatientName``), ``(0010,0010)`` or ``00100010``.

    Exact: no trimming, keywords are case-sensitive. ``where`` names the setting in the error.
    """
    if token and token in keyword_dict:  # pydicom lists a few unnamed tags under ""
        return int(keyword_dict[token])
    if m := _PAREN_TAG.fullmatch(token):
        return int(m.group(1) + m.group(2), 16)
    if _HEX8.fullmatch(token):
        return int(token, 16)
    raise _unknown(token, where)


def split_google_list(value: str) -> list[str]:
    """Split a comma-separated flag value as Google's adapter does (Java ``split(",")``).

    No trimming; empty pieces are kept except trailing ones, which Java drops:
    ``"a,,b,"`` gives ``["a", "", "b"]`` and ``","`` gives ``[]``.
    """
    pieces = value.split(",")
    while pieces and pieces[-1] == "":
        pieces.pop()
    return pieces


def parse_google_tag(token: str, where: str) -> int:
    """A tag exactly as Google's redactor reads one: a keyword, else ``Integer.parseInt(s, 16)``.

    So ``PatientName``, ``00100010`` and also ``100010`` or ``+00100010`` name (0010,0010).
    Google rejects what does not parse, and any value above 7FFFFFFF; a negative number,
    which Google would accept as a tag that never matches anything, is rejected here too.
    """
    if token and token in keyword_dict:
        return int(keyword_dict[token])
    if _JAVA_HEX_INT.fullmatch(token):
        if token.startswith("-"):
            raise TagError(f"{where}: {token!r} is a negative number, not a tag")
        value = int(token, 16)
        if value <= _INT_MAX:
            return value
        raise TagError(
            f"{where}: {token!r} is above 7FFFFFFF, which Google's adapter cannot parse either"
        )
    raise _unknown(token, where)


def parse_tags(tokens: Iterable[object], where: str) -> frozenset[int]:
    """Every token of a configured list as a tag (``parse_tag``); strings only."""
    tags: set[int] = set()
    for token in tokens:
        if not isinstance(token, str):
            raise TagError(f"{where}: {token!r} is not a string")
        tags.add(parse_tag(token, where))
    return frozenset(tags)
