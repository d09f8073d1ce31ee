"""``stowaway serve``, ``receive`` and ``forward``: the long-running commands.

They run :func:`stowaway.service.run` until SIGTERM; the service module is imported
only when one of them runs, so the other commands start without pynetdicom.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from stowaway.commands import Command, add_command
from stowaway.commands.arguments import UsageError
from stowaway.destinations import destination_config
from stowaway.settings import (
    COMMITMENT,
    COMMON,
    DEIDENTIFY,
    FORWARDER,
    HTTP,
    RECEIVER,
    RETENTION,
    ROUTING,
    Settings,
    add_options,
)

log = logging.getLogger("stowaway")

#: The commands that run until stopped: a SIGTERM during their start-up is deferred
#: until they can stop cleanly.
LONG_RUNNING = ("serve", "receive", "forward")


def register(sub: Any) -> None:
    """``stowaway serve``, ``receive`` and ``forward``."""
    commands: list[tuple[str, Command, set[str], str]] = [
        (
            "serve",
            serve,
            {COMMON, RECEIVER, FORWARDER, HTTP, ROUTING, COMMITMENT, DEIDENTIFY, RETENTION},
            "receive and forward in one process",
        ),
        # Both halves read the destinations: the receiver its rules, the forwarder the rest.
        (
            "receive",
            receive,
            {COMMON, RECEIVER, HTTP, ROUTING, COMMITMENT},
            "run the DICOM receiver only",
        ),
        (
            "forward",
            forward,
            {COMMON, FORWARDER, HTTP, ROUTING, DEIDENTIFY, RETENTION},
            "run the forwarder only",
        ),
    ]
    for name, func, groups, help_text in commands:
        add_options(add_command(sub, name, func, help_text), groups)


def serve(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service

    forwards = destination_config(settings) is not None
    if not forwards:
        log.warning(
            "receiving_only",
            extra={
                "reason": "no --dicomweb-url or --destinations: instances are queued "
                "but not forwarded"
            },
        )
    return service.run(settings, receive=True, forward=forwards, retention=True)


def receive(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service

    return service.run(settings, receive=True, forward=False)


def forward(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service

    if destination_config(settings) is None:
        raise UsageError(
            "forward needs --dicomweb-url, --destinations or a destination config "
            "(or STOWAWAY_DICOMWEB_URL)"
        )
    return service.run(settings, receive=False, forward=True, retention=True)
