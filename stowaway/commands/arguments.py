"""Argument types the subcommands share, and how a subcommand reports a misuse (exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NoReturn, TypeVar

from stowaway.db.models import Status
from stowaway.queue_operations import parse_age, parse_since, parse_status

T = TypeVar("T")


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
    return _argument(parse_status, value)


def row_id_arg(value: str) -> int:
    """A queue row id: a positive whole number."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a row id is a positive whole number (got {value!r})")
    return int(value)


def duration_arg(value: str) -> timedelta:
    """``30s``, ``5m``, ``2h``, ``7d``, ``1w`` (a unit is required: ``7`` is ambiguous)."""
    return _argument(parse_age, value)


def since_arg(value: str) -> datetime:
    """A duration ago (``2h``) or an ISO 8601 date/time; without an offset it is UTC."""
    return _argument(parse_since, value)


def _argument(parse: Callable[[str], T], value: str) -> T:
    """``parse`` (the same parsers as the HTTP API's) with argparse's error type."""
    try:
        return parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
