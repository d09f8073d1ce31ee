"""``stowaway queue ...``: look at and act on the queue without SQL."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from db.models import Status, utcnow
from db.queue import QueuedInstance
from stowaway.runtime import open_state
from stowaway.settings import Settings

AddCommon = Callable[[argparse.ArgumentParser], None]


def add_queue_commands(sub: Any, add_common: AddCommon) -> None:
    queue = sub.add_parser("queue", help="inspect and manage the queue")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    ls = queue_sub.add_parser("ls", help="list queued instances, oldest first")
    ls.add_argument("--status", type=_status, help="pending, in_flight, done or failed")
    ls.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    ls.add_argument("--json", action="store_true", help="a JSON array of objects")
    add_common(ls)
    ls.set_defaults(func=queue_ls)

    stats = queue_sub.add_parser("stats", help="counts per status, oldest pending age, bytes")
    stats.add_argument("--json", action="store_true", help="a JSON object")
    add_common(stats)
    stats.set_defaults(func=queue_stats)


def _status(value: str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; one of {', '.join(s.value for s in Status)}"
        ) from None


def queue_ls(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(settings, writable_spool=False)
    try:
        rows = state.queue.rows(status=args.status, limit=args.limit)
    finally:
        state.close()
    if args.json:
        json.dump([row.to_json() for row in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(rows)
    return 0


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _print_table(rows: list[QueuedInstance]) -> None:
    header = ("ID", "SOP INSTANCE UID", "STUDY", "STATUS", "ATT", "NEXT ATTEMPT", "LAST ERROR")
    lines = [
        (
            str(r.id),
            _short(r.sop_instance_uid, 40),
            _short(r.study_instance_uid, 24),
            r.status.value,
            str(r.attempts),
            _when(r.next_attempt_at) if r.status == Status.PENDING else "-",
            _short(r.last_error, 50),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no rows)")


def queue_stats(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(settings, writable_spool=False)
    try:
        stats = state.queue.stats()
    finally:
        state.close()
    oldest = stats.oldest_pending_received_at
    age = (utcnow() - oldest).total_seconds() if oldest else None
    out = {
        **{status.value: stats.counts[status] for status in Status},
        "bytes": {status.value: stats.bytes[status] for status in Status},
        "oldest_pending_age_seconds": age,
        "bytes_waiting": stats.bytes[Status.PENDING] + stats.bytes[Status.IN_FLIGHT],
    }
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for status in Status:
        print(f"{status.value:<10} {stats.counts[status]:>8}  {stats.bytes[status]:>14} bytes")
    print(f"oldest pending: {f'{age:.0f} s ago' if age is not None else '-'}")
    return 0
