"""``stowaway queue ...``: look at and act on the queue without SQL.

``ls``, ``show`` and ``stats`` only read. ``requeue`` and ``purge`` change rows in
chunks of ``Queue.OPERATOR_CHUNK`` ids per transaction, each change guarded by
the state the row must be in, so they are safe while ``serve`` runs: a row a
forwarder holds under a live lease is never touched.

How rows are chosen, what is shown and what the actions do is
:mod:`stowaway.queue_operations`, shared with the HTTP API; here are the flags, the
questions and the printing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from stowaway import queue_operations as ops
from stowaway.commands import Command
from stowaway.commands.arguments import (
    duration_arg,
    row_id_arg,
    since_arg,
    status_arg,
    usage_error,
)
from stowaway.commands.formatting import (
    Progress,
    ago,
    human_bytes,
    print_json,
    print_table,
    shorten,
    timestamp,
)
from stowaway.db.models import DestinationState, Status
from stowaway.db.queue import Queue, QueuedInstance
from stowaway.destinations import destination_config
from stowaway.runtime import open_state
from stowaway.settings import COMMON, FORWARDER, ROUTING, Settings, add_options

AddArguments = Callable[[argparse.ArgumentParser], None]

#: How many rows ``purge`` lists before asking.
PREVIEW_ROWS = 5


def register(sub: Any) -> None:
    """``stowaway queue ls|show|stats|requeue|purge``."""
    queue = sub.add_parser("queue", help="inspect and manage the queue")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    table: list[tuple[str, Command, str, str | None, AddArguments]] = [
        ("ls", queue_ls, "list queued instances, oldest first", None, _ls_arguments),
        (
            "show",
            queue_show,
            "everything about one row: full error, history, spool file state",
            None,
            _show_arguments,
        ),
        (
            "stats",
            queue_stats,
            "counts and bytes per status, oldest pending, destination, last hour",
            None,
            _stats_arguments,
        ),
        (
            "requeue",
            queue_requeue,
            "back to pending, due now, attempts reset (last error kept in history)",
            "Put rows back to pending, due now, with attempts reset; the last "
            "error is kept in the row's history. Select rows by ID, --failed, or --status "
            "(optionally with --study). A row in_flight is only requeued when its lease "
            "has expired. When its SOP Instance UID already has another pending row, the "
            "more recent copy stays pending and the other is closed as superseded.",
            _requeue_arguments,
        ),
        (
            "purge",
            queue_purge,
            "delete rows and their spool files",
            "Delete rows and their spool files: by ID, every --failed or every "
            "--done row, optionally only those --older-than an age (received time; "
            "forwarded time for done rows). Without --yes it lists what would go and asks "
            "on a terminal; with no terminal it refuses. A row in_flight under a live "
            "lease is never purged.",
            _purge_arguments,
        ),
        (
            "reroute",
            queue_reroute,
            "route unrouted instances with the rules as they are now",
            "Evaluate the routing rules (the same --destinations or destination config "
            "flags as serve) again for unrouted rows, by ID or all of them, and give each "
            "the deliveries they choose. --dry-run prints what would happen. Rows already "
            "routed are never re-routed: change the rules, then requeue if needed.",
            _reroute_arguments,
        ),
    ]
    for name, func, help_text, description, add_arguments in table:
        parser = actions.add_parser(name, help=help_text, description=description)
        add_arguments(parser)
        add_options(parser, {COMMON, ROUTING, FORWARDER} if name == "reroute" else {COMMON})
        parser.set_defaults(func=func, subparser=parser)


def _destination_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--destination", metavar="NAME", help="only this destination's rows")


def _ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status", type=status_arg, help="pending, in_flight, done, failed or unrouted"
    )
    _destination_argument(parser)
    parser.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    parser.add_argument(
        "--since",
        type=since_arg,
        metavar="T",
        help="received at or after T: an ISO date/time (UTC unless it has an offset) "
        "or a duration ago such as 2h or 7d",
    )
    parser.add_argument(
        "--limit", type=int, default=100, help="at most this many rows (default 100)"
    )
    parser.add_argument("--json", action="store_true", help="a JSON array of objects")


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="ID|SOP_INSTANCE_UID")
    parser.add_argument("--json", action="store_true", help="a JSON object (array for a UID)")


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="a JSON object")
    parser.add_argument(
        "--dicomweb-url",
        "--dicomweb_address",
        dest="dicomweb_url",
        default=None,
        metavar="URL",
        help="show only this destination's state [env STOWAWAY_DICOMWEB_URL; "
        "default: every destination the forwarder recorded]",
    )


def _add_row_selection(parser: argparse.ArgumentParser) -> None:
    """Row IDs or ``--failed``: how ``requeue`` and ``purge`` both start choosing rows."""
    parser.add_argument("ids", nargs="*", type=row_id_arg, metavar="ID")
    parser.add_argument("--failed", action="store_true", help="every failed row")


def _requeue_arguments(parser: argparse.ArgumentParser) -> None:
    _add_row_selection(parser)
    _destination_argument(parser)
    parser.add_argument("--status", type=status_arg, help="every row in this status")
    parser.add_argument("--study", metavar="UID", help="with --failed/--status: only this study")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _reroute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", type=row_id_arg, metavar="ID")
    parser.add_argument("--dry-run", action="store_true", help="show, change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _purge_arguments(parser: argparse.ArgumentParser) -> None:
    _add_row_selection(parser)
    _destination_argument(parser)
    parser.add_argument("--done", action="store_true", help="every done row")
    parser.add_argument(
        "--older-than",
        type=duration_arg,
        metavar="AGE",
        help="only rows older than AGE, e.g. 7d (received; forwarded for done rows)",
    )
    parser.add_argument("--yes", action="store_true", help="do not ask")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


# ---------------------------------------------------------------------- ls


def queue_ls(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(settings, writable_spool=False)
    try:
        selection = ops.ListSelection(
            status=args.status, destination=args.destination, study=args.study, since=args.since
        )
        rows = ops.list_rows(state.queue, selection, args.limit)
    finally:
        state.close()
    if args.json:
        print_json([row.to_json() for row in rows])
    else:
        _print_rows(rows)
    return 0


def _print_rows(rows: list[QueuedInstance]) -> None:
    header = (
        "ID",
        "SOP INSTANCE UID",
        "STUDY",
        "DESTINATION",
        "STATUS",
        "ATT",
        "NEXT ATTEMPT",
        "LAST ERROR",
    )
    lines = [
        (
            str(r.id),
            shorten(r.sop_instance_uid, 40),
            shorten(r.study_instance_uid, 24),
            r.destination or "-",
            r.status.value,
            str(r.attempts),
            timestamp(r.next_attempt_at) if r.status == Status.PENDING else "-",
            shorten(r.last_error, 50),
        )
        for r in rows
    ]
    print_table(header, lines)
    if not rows:
        print("(no rows)")


# ---------------------------------------------------------------------- show


def queue_show(settings: Settings, args: argparse.Namespace) -> int:
    target = args.target.strip()
    state = open_state(settings, writable_spool=False)
    try:
        if target.isdigit():
            row = state.queue.get(int(target))
            rows = [row] if row is not None else []
        else:
            rows = state.queue.find_by_sop(target)
        details = [ops.instance_details(state.queue, state.spool, row) for row in rows]
    finally:
        state.close()
    if not rows:
        what = "id" if target.isdigit() else "SOP Instance UID"
        print(f"stowaway: no queue row with {what} {target}", file=sys.stderr)
        return 1
    if args.json:
        print_json(details[0] if target.isdigit() else details)
        return 0
    for i, detail in enumerate(details):
        if i:
            print()
        _print_details(detail)
    return 0


def describe_applied(applied: dict[str, Any] | None, status: str) -> str:
    """What the destination was sent, in one line, from the row's record."""
    if status != Status.DONE.value:
        return "- (recorded when the destination takes it)"
    if not applied:
        return "as received (the spooled bytes)"
    parts = []
    redact = applied.get("redact")
    if redact:
        parts.append(
            f"redacted {redact['profile']} (uid {redact['uid_scheme']}): "
            f"{redact['removed']} removed, {redact['emptied']} emptied, "
            f"{redact['replaced']} replaced, {redact['uids_mapped']} UIDs mapped; "
            f"sent as SOP Instance UID {redact['sop_instance_uid']}"
            + (
                "; BurnedInAnnotation YES: pixels not cleaned"
                if redact.get("burned_in_annotation")
                else ""
            )
        )
    transcode = applied.get("transcode")
    if transcode:
        if transcode["applied"]:
            ratio = f", ratio {transcode['ratio']}" if transcode.get("ratio") else ""
            parts.append(f"compressed to {transcode['transfer_syntax']}{ratio}")
        else:
            parts.append(f"not compressed to {transcode.get('target', '?')}: {transcode['reason']}")
    return "; ".join(parts)


def _print_details(detail: dict[str, Any]) -> None:
    skip = {"spool_file", "events", "applied"}
    width = max(len(k) for k in detail)
    for key, value in detail.items():
        if key not in skip:
            print(f"{key:<{width}}  {'-' if value is None else value}")
    print(f"{'applied':<{width}}  {describe_applied(detail['applied'], detail['status'])}")
    spool_file = detail["spool_file"]
    if spool_file["intact"]:
        state = "present, intact"
    elif spool_file["present"]:
        state = f"CORRUPT: {spool_file['problem']}"
    elif detail["status"] == Status.DONE.value:
        state = "deleted after upload"
    else:
        state = f"MISSING: {spool_file['problem']}"
    print(f"{'spool_file':<{width}}  {spool_file['absolute_path']} ({state})")
    print("history:" if detail["events"] else "history: (none)")
    for event in detail["events"]:
        print(f"  {event['at']}  {event['kind']:<10}  {event['detail'] or ''}".rstrip())


# ---------------------------------------------------------------------- stats


def queue_stats(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(settings, writable_spool=False)
    try:
        out = ops.queue_summary(state.queue, settings.dicomweb_url)
    finally:
        state.close()
    destinations = out["destinations"]
    last_hour = out["last_hour"]
    age = out["oldest_pending_age_seconds"]
    if args.json:
        print_json(out)
        return 0
    for status in Status:
        count, size = out[status.value], out["bytes"][status.value]
        print(f"{status.value:<10} {count:>8}  {size:>14} bytes")
    print(f"oldest pending: {f'{age:.0f} s ago' if age is not None else '-'}")
    if not destinations:
        print("destination: none recorded yet (the forwarder records one when it runs)")
    for d in destinations:
        label = d["name"] + (f" ({d['url']})" if d["url"] else "")
        waiting = f"{d['pending']} waiting, {d['failed']} failed"
        if d["state"] == "unknown":
            print(
                f"destination {label}: {waiting}; state unknown (not recorded by a forwarder yet)"
            )
            continue
        since = datetime.fromisoformat(d["since"])
        line = (
            f"destination {label}: {waiting}; {d['state']} since {timestamp(since)} UTC "
            f"({ago(since)})"
        )
        if d["state"] == DestinationState.BLOCKED.value:
            line += f": {d['reason'] or 'no reason recorded'}"
        print(line)
    print(
        f"last hour: {last_hour['uploaded']} uploaded, {last_hour['failed']} failed, "
        f"{last_hour['retried']} retried"
    )
    return 0


# ---------------------------------------------------------------------- requeue


def _misuse(args: argparse.Namespace, call: Callable[[], Any]) -> Any:
    """``call()``, with a selection that makes no sense reported as a usage error."""
    try:
        return call()
    except ops.SelectionError as exc:
        usage_error(args, str(exc))


def queue_requeue(settings: Settings, args: argparse.Namespace) -> int:
    selection = ops.RequeueSelection(
        ids=tuple(args.ids),
        failed=args.failed,
        status=args.status,
        study=args.study,
        destination=args.destination,
    )
    _misuse(args, selection.check)
    state = open_state(settings, writable_spool=False)
    progress = Progress("requeue", 0, enabled=not args.json)
    try:
        result = _misuse(
            args,
            lambda: ops.requeue(state, selection, settings.node_id, on_progress=progress.follow),
        )
        progress.finish()
    finally:
        state.close()
    if args.json:
        print_json({**result, "requeued": len(result["requeued"])})
    else:
        _print_requeue(result)
    refused = result["not_found"] + result["leased"] + result["file_gone"]
    return 1 if args.ids and refused else 0


def _print_requeue(result: dict[str, list[int]]) -> None:
    print(f"requeued {len(result['requeued'])} row(s)")
    notes = [
        (
            "superseded",
            "closed as superseded: a newer copy of the same instance exists",
        ),
        ("leased", "left alone: in_flight under a live lease (a forwarder is uploading them)"),
        ("file_gone", "skipped: done and the spool file is gone (deleted after upload)"),
        ("not_found", "not found"),
    ]
    for key, text in notes:
        if result[key]:
            shown = ", ".join(map(str, result[key][:20]))
            more = f" … and {len(result[key]) - 20} more" if len(result[key]) > 20 else ""
            print(f"{len(result[key])} {text}: {shown}{more}")


# ---------------------------------------------------------------------- purge


def queue_purge(settings: Settings, args: argparse.Namespace) -> int:
    selection = ops.PurgeSelection(
        ids=tuple(args.ids),
        failed=args.failed,
        done=args.done,
        older_than=args.older_than,
        destination=args.destination,
    )
    _misuse(args, selection.check)
    state = open_state(settings)
    try:
        ids, not_found = ops.purge_candidates(state.queue, selection)
        if not ids:
            if args.json:
                print_json({"purged": 0, "bytes": 0, "files_removed": 0, "not_found": not_found})
            else:
                print("nothing to purge" + (f"; not found: {not_found}" if not_found else ""))
            return 1 if not_found else 0
        if not args.yes:
            _preview(state.queue, ids, sys.stderr if args.json else sys.stdout)
            if not sys.stdin.isatty():
                print(
                    f"stowaway: refusing to purge {len(ids)} row(s) without --yes "
                    "(no terminal to ask on)",
                    file=sys.stderr,
                )
                return 1
            sys.stderr.write(f"Delete these {len(ids)} row(s) and their spool files? [y/N] ")
            sys.stderr.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                print("not purged", file=sys.stderr)
                return 1
        progress = Progress("purge", len(ids), enabled=not args.json)
        result = ops.purge(state, ids, selection.statuses, on_progress=progress.follow)
        progress.finish()
    finally:
        state.close()
    summary = ops.purge_json(result, ids, not_found)
    skipped = summary["skipped"]
    if args.json:
        print_json(summary)
    else:
        print(
            f"purged {len(result['deleted'])} row(s), {human_bytes(result['bytes'])}; "
            f"removed {result['files_removed']} spool file(s)"
        )
        if skipped:
            print(
                f"{len(skipped)} left alone: in_flight under a live lease, or changed "
                f"meanwhile: {', '.join(map(str, skipped[:20]))}"
            )
        if not_found:
            print(f"{len(not_found)} not found: {', '.join(map(str, not_found[:20]))}")
        if result["file_errors"]:
            print(
                f"{len(result['file_errors'])} spool file(s) could not be removed "
                "(`stowaway reconcile --fix` removes them later)"
            )
    failed = result["file_errors"] or (args.ids and (skipped or not_found))
    return 1 if failed else 0


def _preview(queue: Queue, ids: list[int], out: TextIO) -> None:
    size = queue.total_bytes(ids)
    print(f"would purge {len(ids)} row(s), {human_bytes(size)}:", file=out)
    for row_id in ids[:PREVIEW_ROWS]:
        row = queue.get(row_id)
        if row is not None:
            print(
                f"  {row.id}  {row.sop_instance_uid}  {row.status.value}  "
                f"{human_bytes(row.size_bytes)}  {shorten(row.last_error, 60)}".rstrip(),
                file=out,
            )
    if len(ids) > PREVIEW_ROWS:
        print(f"  … and {len(ids) - PREVIEW_ROWS} more", file=out)


# ---------------------------------------------------------------------- reroute


def queue_reroute(settings: Settings, args: argparse.Namespace) -> int:
    config = destination_config(settings)
    if config is None:
        usage_error(args, "give the routing flags serve runs with (--destinations, ...)")
    state = open_state(settings, writable_spool=False)
    try:
        result = ops.reroute(state, config, args.ids, dry_run=args.dry_run)
    finally:
        state.close()
    plan, not_found = result["rows"], result["not_found"]
    if args.json:
        print_json({"rows": plan, "dry_run": args.dry_run, "not_found": not_found})
    else:
        for entry in plan:
            where = ", ".join(entry["destinations"]) or "still no destination"
            verb = "would go to" if args.dry_run else "goes to"
            print(f"row {entry['id']}: {verb} {where}")
        if not plan:
            print("no unrouted rows")
        for row_id in not_found:
            print(f"row {row_id}: not unrouted or not found", file=sys.stderr)
    return 1 if not_found else 0
