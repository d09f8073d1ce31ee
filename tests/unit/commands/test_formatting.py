"""The commands' (and the health endpoint's) one way of showing sizes and ages."""

from __future__ import annotations

from datetime import timedelta

from stowaway.commands.formatting import age_text, ago, human_bytes, shorten
from stowaway.db.models import utcnow


def test_one_byte_formatter_from_bytes_to_tebibytes() -> None:
    assert human_bytes(0) == "0 bytes"
    assert human_bytes(1023) == "1023 bytes"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    # /readyz reports disks in TiB; the CLI says the same for the same size.
    assert human_bytes(1000 * 1024**4) == "1000.0 TiB"
    assert human_bytes(5 * 1024**5) == "5120.0 TiB"


def test_an_age_is_shown_in_the_largest_unit_that_reads_as_two_or_more() -> None:
    assert [age_text(s) for s in (0, 119, 120, 7199, 7200, 172799, 172800)] == [
        "0s",
        "119s",
        "2m",
        "120m",
        "2h",
        "48h",
        "2d",
    ]
    assert ago(utcnow() - timedelta(hours=3)) == "3h ago"
    assert ago(utcnow() + timedelta(hours=3)) == "0s ago"


def test_shorten_keeps_one_line_and_marks_the_cut() -> None:
    assert shorten("a\nb", 10) == "a b"
    assert shorten("x" * 12, 10) == "x" * 9 + "…"
    assert shorten(None, 5) == ""
