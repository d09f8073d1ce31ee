"""Argument types the subcommands share, and how a subcommand reports a misuse (exit 2)."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from stowaway.db.models import Status, utcnow


class UsageError(Exception):
    """A CLI misuse: exit code 2."""


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """A misuse found after parsing: the subcommand's usage and ``message`` on stderr, exit 2.

    The subcommand's parser must be in ``args.subparser`` (``set_defaults(subparser=...)``).
    """
    parser: argparse.ArgumentParser = args.subparser
    parser.error(message)


def status_arg(value: str) -> Status:
    """A queue status by its name: ``pending``, ``in_flight``, ``done`` or ``failed``."""
    try:
        return Status(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; one of {', '.join(s.value for s in Status)}"
        ) from None


def row_id_arg(value: str) -> int:
    """A queue row id: a positive whole number."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a row id is a positive whole number (got {value!r})")
    return int(value)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_arg(value: str) -> timedelta:
    """``30s``, ``5m``, ``2h``, ``7d``, ``1w`` (a unit is required: ``7`` is ambiguous)."""
    match = _DURATION.fullmatch(value)
    if not match:
        raise argparse.ArgumentTypeError(f"a duration such as 30s, 5m, 2h or 7d (got {value!r})")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def since_arg(value: str) -> datetime:
    """A duration ago (``2h``) or an ISO 8601 date/time; without an offset it is UTC."""
    if _DURATION.fullmatch(value):
        return utcnow() - duration_arg(value)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"an ISO date/time such as 2026-01-31 or 2026-01-31T08:00, "
            f"or a duration ago such as 2h or 7d (got {value!r})"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
