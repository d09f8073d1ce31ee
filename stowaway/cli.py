"""The ``stowaway`` command: parses flags, then hands over to one subcommand.

Exit codes: 0 success, 1 a check or operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from stowaway import __version__, stop_signal
from stowaway.logs import configure_logging
from stowaway.runtime import StartupError
from stowaway.settings import (
    COMMON,
    FORWARDER,
    HTTP,
    RECEIVER,
    ROUTING,
    Settings,
    SettingsError,
    add_options,
    load_settings,
)

log = logging.getLogger("stowaway")

Command = Callable[[Settings, argparse.Namespace], int]


class UsageError(Exception):
    """A CLI misuse: exit code 2."""


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service
    from stowaway.destinations import destination_config

    forwards = destination_config(settings) is not None
    if not forwards:
        log.warning(
            "receiving_only",
            extra={
                "reason": "no --dicomweb-url or --destinations: instances are queued "
                "but not forwarded"
            },
        )
    return service.run(settings, receive=True, forward=forwards)


def _receive(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service

    return service.run(settings, receive=True, forward=False)


def _forward(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway import service
    from stowaway.destinations import destination_config

    if destination_config(settings) is None:
        raise UsageError(
            "forward needs --dicomweb-url, --destinations or a destination config "
            "(or STOWAWAY_DICOMWEB_URL)"
        )
    return service.run(settings, receive=False, forward=True)


def _migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from stowaway.db.engine import make_engine
    from stowaway.db.migrate import current_revision, upgrade_to_head

    engine = make_engine(settings.db_url)
    try:
        upgrade_to_head(engine)
        log.info("migrated", extra={"revision": current_revision(engine)})
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stowaway import queue_cli

    parser = argparse.ArgumentParser(
        prog="stowaway",
        description="Durable store-and-forward DICOM adapter: C-STORE in, STOW-RS out.",
    )
    parser.add_argument("--version", action="version", version=f"stowaway {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, groups: set[str], help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_options(command, groups)
        command.set_defaults(func=func)
        return command

    everything = {COMMON, RECEIVER, FORWARDER, HTTP, ROUTING}
    add("serve", _serve, everything, "receive and forward in one process")
    add("receive", _receive, {COMMON, RECEIVER, HTTP, ROUTING}, "run the DICOM receiver only")
    # The forwarder sends as the receiver's first AE title (DICOM destinations).
    add("forward", _forward, {COMMON, FORWARDER, HTTP, ROUTING}, "run the forwarder only")
    add("migrate", _migrate, {COMMON}, "bring the queue database schema to the latest revision")
    queue_cli.add_queue_commands(sub, lambda p: add_options(p, {COMMON}))
    from stowaway import check, reconcile

    reconcile.add_reconcile_command(sub, lambda p: add_options(p, {COMMON}))
    check.add_check_command(sub, lambda p: add_options(p, everything))
    return parser


LONG_RUNNING = ("serve", "receive", "forward")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # First of all, so that a SIGTERM during start-up still stops a service cleanly.
    command = next((a for a in argv if not a.startswith("-")), None)
    stop_signal.install(deferred=command in LONG_RUNNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        parser.exit(2, f"stowaway: error: {exc}\n")
    configure_logging(settings.log_level, settings.log_format)
    # Everything stowaway creates (database, -wal/-shm, spool, temporary files)
    # holds patient data: owner-only, whatever umask the shell or image had.
    os.umask(0o077)
    try:
        return int(args.func(settings, args))
    except UsageError as exc:
        print(f"stowaway: error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        if args.debug:
            raise
        print(f"stowaway: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        first_line = (str(exc).splitlines() or [""])[0][:300]
        name = type(exc).__name__
        print(f"stowaway: {name}: {first_line} (--debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
