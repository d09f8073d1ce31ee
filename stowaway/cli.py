"""The ``stowaway`` command: parses flags, then hands over to one subcommand.

Exit codes: 0 success, 1 a check or operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stowaway import __version__, stop_signal
from stowaway.commands import Register, check, commitments, migrate, queue, reconcile, serve
from stowaway.commands.arguments import UsageError
from stowaway.commands.serve import LONG_RUNNING
from stowaway.db.engine import DatabaseEncodingError
from stowaway.logs import configure_logging
from stowaway.runtime import StartupError
from stowaway.settings import SettingsError, load_settings
from stowaway.text import describe_error

# The subcommands, in the order ``stowaway --help`` lists them.
REGISTRATIONS: tuple[Register, ...] = (
    serve.register,
    migrate.register,
    queue.register,
    commitments.register,
    reconcile.register,
    check.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stowaway",
        description="Durable store-and-forward DICOM adapter: C-STORE in, STOW-RS out.",
    )
    parser.add_argument("--version", action="version", version=f"stowaway {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRATIONS:
        register(sub)
    return parser


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
    except (StartupError, DatabaseEncodingError) as exc:
        if args.debug:
            raise
        print(f"stowaway: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(f"stowaway: {describe_error(exc, 300)} (--debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
