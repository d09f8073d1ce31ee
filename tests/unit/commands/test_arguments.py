"""The operator commands' argument types (durations, ``--since``) and their sizes."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from stowaway.commands.arguments import duration_arg, since_arg
from stowaway.commands.formatting import human_bytes
from stowaway.db.models import utcnow


def test_duration_and_since_arguments() -> None:
    assert duration_arg("7d") == timedelta(days=7)
    assert duration_arg("90m") == timedelta(minutes=90)
    assert duration_arg("500ms") == timedelta(milliseconds=500)
    for bad in ("7", "x", "-1d", "1y"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_arg(bad)
    assert abs((utcnow() - since_arg("2h")) - timedelta(hours=2)) < timedelta(seconds=5)
    assert since_arg("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    assert since_arg("2026-01-31T10:00+01:00") == datetime(2026, 1, 31, 9, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError):
        since_arg("yesterday")
    assert human_bytes(512) == "512 bytes"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"
