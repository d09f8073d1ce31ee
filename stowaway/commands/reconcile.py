"""``stowaway reconcile``: make the spool and the queue agree again after a crash.

What it finds and repairs is described in :mod:`stowaway.db.reconcile`: orphan spool
files, leftover partial receipts, rows whose file is missing or corrupt, and expired
leases. Nothing changes without ``--fix`` (or ``--adopt``); every change is guarded
in SQL, so reconcile may run while ``serve`` runs. Only rows of this ``--node-id``
are checked for files (other nodes' files live on other volumes).

``--adopt`` routes each orphan with the routing flags ``serve`` runs with
(``--destinations`` or Google's destination config), from the file's header: what only
the association knew (calling and called AE title, peer) is unknown, so an orphan whose
route would depend on it is left for the operator (docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from stowaway.commands import add_command, summary
from stowaway.commands.arguments import duration_arg
from stowaway.commands.formatting import age_text, print_json
from stowaway.db.models import utcnow
from stowaway.db.reconcile import REASON_PREFIX, NotRoutable, Report, Router, run_reconcile
from stowaway.destinations import destination_config
from stowaway.receiver.routing import NeedsAssociation, RoutingTable, dataset_attributes
from stowaway.runtime import open_state
from stowaway.settings import COMMON, FORWARDER, ROUTING, Settings, add_options

#: Items listed per category in the text report.
SHOWN = 20
DEFAULT_GRACE = timedelta(hours=1)


def register(sub: Any) -> None:
    """``stowaway reconcile``."""
    parser = add_command(
        sub,
        "reconcile",
        reconcile_command,
        "find (and with --fix repair) disagreements between the spool and the queue",
        description=summary(__doc__),
    )
    parser.add_argument(
        "--fix",
        action="store_true",
        help="delete orphan and leftover files, mark broken rows failed, release expired leases",
    )
    parser.add_argument(
        "--adopt",
        action="store_true",
        help="queue orphan spool files as new pending rows instead of deleting them, "
        "routed by the routing flags serve runs with (--destinations, ...)",
    )
    parser.add_argument(
        "--grace-age",
        type=duration_arg,
        default=DEFAULT_GRACE,
        metavar="AGE",
        help="leave files younger than this alone (default 1h)",
    )
    parser.add_argument(
        "--no-checksum",
        action="store_true",
        help="check spool files by size only (fast on a big backlog)",
    )
    parser.add_argument(
        "--empty-spool-ok",
        action="store_true",
        help="with --fix, mark rows failed even when the spool holds no file at all "
        "(by default that looks like an unmounted volume and they are left alone)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    # The routing flags, as `queue reroute` takes them: where --adopt queues orphans.
    add_options(parser, {COMMON, ROUTING, FORWARDER})


#: What the operator can do with an orphan whose route needs its association.
NOT_ROUTABLE_HINT = (
    "to queue it, send the file again as its sender did (its AE title, from its address), "
    "then --fix deletes this copy; to drop it, run --fix without --adopt"
)


def file_router(routing: RoutingTable) -> Router:
    """Route an orphan spool file from its header, as the receiver routed its receipt:
    only the tags rules test are read, and an unreadable header matches no attribute
    rule. Raises NotRoutable where the route needs the association (unknown here)."""

    def route(path: Path) -> tuple[str, ...]:
        header: list[Dataset] = []

        def attribute(tag: BaseTag) -> tuple[str, ...]:
            if not header:
                try:
                    tags = sorted(routing.tested_tags)
                    header.append(dcmread(path, stop_before_pixels=True, specific_tags=tags))
                except Exception:  # as at receipt: no attribute rule matches
                    header.append(Dataset())
            return dataset_attributes(header[0])(tag)

        try:
            return routing.route_without_association(attribute).destinations
        except NeedsAssociation as exc:
            raise NotRoutable(f"{exc}; {NOT_ROUTABLE_HINT}") from None

    return route


def report_json(report: Report) -> dict[str, Any]:
    """The report as ``--json`` prints it."""
    return {
        "grace_age_seconds": report.grace_seconds,
        "leftovers": [str(p) for p in report.leftovers],
        "leftovers_removed": report.leftovers_removed,
        "orphans": [
            {
                "path": o.path,
                "size_bytes": o.size_bytes,
                "age_seconds": round(o.age_seconds),
                "action": o.action,
                "row_ids": list(o.row_ids),
                "destinations": list(o.destinations),
            }
            for o in report.orphans
        ],
        "young_orphans": report.young_orphans,
        "broken_rows": [
            {
                "id": b.row.id,
                "sop_instance_uid": b.row.sop_instance_uid,
                "status": b.row.status.value,
                "spool_path": b.row.spool_path,
                "reason": b.reason,
                "action": b.action,
            }
            for b in report.broken
        ],
        "recorded_broken_rows": report.recorded_broken,
        "expired_leases": [
            {
                "id": e.row.id,
                "sop_instance_uid": e.row.sop_instance_uid,
                "lease_owner": e.row.lease_owner,
                "lease_expires_at": (
                    e.row.lease_expires_at.isoformat() if e.row.lease_expires_at else None
                ),
                "action": e.action,
            }
            for e in report.expired
        ],
        "problems": report.problems(),
        "remaining": report.remaining(),
    }


def _section(title: str, lines: list[str]) -> None:
    print(f"{title}: {len(lines)}")
    for line in lines[:SHOWN]:
        print(f"  {line}")
    if len(lines) > SHOWN:
        print(f"  … and {len(lines) - SHOWN} more (--json lists all)")


def _arrow(action: str, default: str) -> str:
    return f" -> {action or default}"


def print_report(report: Report, *, acting: bool) -> None:
    grace = age_text(report.grace_seconds)
    would = "would be fixed by --fix"
    _section(
        f"leftover partial receipts in incoming/ and tmp/ older than {grace}",
        [
            f"{p.name}{' -> deleted' if acting and report.leftovers_removed else ''}"
            for p in report.leftovers
        ],
    )
    _section(
        f"spool files with no queue row, older than {grace}",
        [
            f"{o.path}  {o.size_bytes} bytes  {age_text(o.age_seconds)} old"
            + _arrow(o.action, "would be deleted by --fix, or queued by --adopt")
            for o in report.orphans
        ],
    )
    if report.young_orphans:
        print(
            f"  ({report.young_orphans} younger file(s) with no row left alone: "
            "a receipt may be committing)"
        )
    _section(
        "rows whose spool file is missing or corrupt",
        [
            f"row {b.row.id} {b.row.sop_instance_uid} {b.row.status.value}: "
            f"{b.reason[len(REASON_PREFIX) :]}" + _arrow(b.action, "would be marked failed")
            for b in report.broken
        ],
    )
    if report.recorded_broken:
        print(
            f"  ({report.recorded_broken} failed row(s) already record a missing or corrupt "
            "file: remove them with `stowaway queue purge ID...`)"
        )
    now = utcnow()
    _section(
        "leases held past expiry",
        [
            f"row {e.row.id} {e.row.sop_instance_uid} held by {e.row.lease_owner}, "
            f"expired {age_text((now - e.row.lease_expires_at).total_seconds())} ago"
            + _arrow(e.action, f"{would} (a running forwarder re-claims it anyway)")
            for e in report.expired
            if e.row.lease_expires_at is not None
        ],
    )
    problems, remaining = report.problems(), report.remaining()
    if problems == 0:
        print("ok: the spool and the queue agree")
    elif remaining == 0:
        print(f"fixed: {problems} problem(s)")
    else:
        hint = "run `stowaway reconcile --fix` to repair" if not acting else "see above"
        print(f"{remaining} problem(s) remain: {hint}")


def reconcile_command(settings: Settings, args: argparse.Namespace) -> int:
    # A report needs no write access: an operator may inspect a read-only volume.
    config = destination_config(settings) if args.adopt else None  # parsed at start-up
    route = file_router(config.routing) if config is not None else None
    state = open_state(settings, writable_spool=args.fix or args.adopt)
    try:
        report = run_reconcile(
            state,
            node_id=settings.node_id,
            grace_seconds=args.grace_age.total_seconds(),
            delete=args.fix,
            adopt_orphans=args.adopt,
            checksum=not args.no_checksum,
            empty_spool_ok=args.empty_spool_ok,
            route=route,
        )
    finally:
        state.close()
    if args.json:
        print_json(report_json(report))
    else:
        print_report(report, acting=args.fix or args.adopt)
    sys.stdout.flush()
    return 0 if report.remaining() == 0 else 1
