"""``stowaway check``: is this gateway able to work, and if not, what to fix.

One line per check, in the order the data flows::

    ok   database: sqlite:///data/queue.db reachable, schema at the latest revision 0002
    FAIL permission: HTTP 403 — the service account lacks roles/healthcare.dicomEditor ...

``ok``, ``FAIL`` (with the fix after the dash), ``WARN`` (worth knowing, does not fail:
e.g. the DICOM port is taken because stowaway already runs) or ``skip`` (not
applicable, or an earlier check failed). Exit code 0 when nothing failed, else 1.

Takes the same flags as ``serve``, so an operator can run the serve command line
with ``check`` in place of ``serve``. The checks themselves are in
:mod:`stowaway.preflight`.
"""

from __future__ import annotations

import argparse
from typing import Any

from stowaway.commands import add_command, summary
from stowaway.preflight import Result, run_checks
from stowaway.settings import (
    COMMON,
    DEIDENTIFY,
    FORWARDER,
    HTTP,
    RECEIVER,
    ROUTING,
    Settings,
    add_options,
)


def register(sub: Any) -> None:
    """``stowaway check`` (with every ``serve`` flag)."""
    parser = add_command(
        sub,
        "check",
        check_command,
        "check the database, spool, DICOM port, destination, credentials and permission",
        description=summary(__doc__),
    )
    add_options(parser, {COMMON, RECEIVER, FORWARDER, HTTP, ROUTING, DEIDENTIFY})
    parser.set_defaults(preflight=True)


def check_command(settings: Settings, _args: argparse.Namespace) -> int:
    def emit(result: Result) -> None:
        print(result.line(), flush=True)

    results = run_checks(settings, emit)
    return 1 if any(r.failed for r in results) else 0
