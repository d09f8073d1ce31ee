"""``stowaway commitments ...``: the storage commitment requests, without SQL.

``ls`` lists requests newest first with their items' counts; ``show`` gives one request
(by id or Transaction UID) with every item, its result and Failure Reason, and why.
Both only read.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stowaway.commands.formatting import print_json, print_table, shorten, timestamp
from stowaway.db.commitments import CommitmentRecord, Commitments, settle_item
from stowaway.db.models import CommitmentStatus
from stowaway.runtime import open_state
from stowaway.settings import COMMON, Settings, add_options


def register(sub: Any) -> None:
    """``stowaway commitments ls|show``."""
    parser = sub.add_parser("commitments", help="storage commitment requests and their reports")
    actions = parser.add_subparsers(dest="commitments_command", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list requests, newest first")
    ls.add_argument("--status", type=_status, help="open, reported or abandoned")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--json", action="store_true", help="a JSON array of objects")
    ls.set_defaults(func=commitments_ls, subparser=ls)
    show = actions.add_parser("show", help="one request: every item, its result and why")
    show.add_argument("target", metavar="ID|TRANSACTION_UID")
    show.add_argument("--json", action="store_true", help="a JSON object (array for a UID)")
    show.set_defaults(func=commitments_show, subparser=show)
    for action in (ls, show):
        add_options(action, {COMMON})


def _status(value: str) -> CommitmentStatus:
    try:
        return CommitmentStatus(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; one of {', '.join(s.value for s in CommitmentStatus)}"
        ) from None


def _summary(record: CommitmentRecord, counts: dict[str, int]) -> dict[str, Any]:
    return {**record.to_json(), "items": counts}


def commitments_ls(settings: Settings, args: argparse.Namespace) -> int:
    state = open_state(settings, writable_spool=False)
    try:
        commitments = Commitments(state.engine)
        rows = commitments.rows(status=args.status, limit=args.limit)
        counts = commitments.item_counts([r.id for r in rows])
    finally:
        state.close()
    if args.json:
        print_json([_summary(r, counts[r.id]) for r in rows])
        return 0
    header = ("ID", "TRANSACTION UID", "REQUESTER", "STATUS", "REQUESTED", "ITEMS", "LAST ERROR")
    lines = [
        (
            str(r.id),
            shorten(r.transaction_uid, 40),
            r.calling_aet,
            _state(r),
            timestamp(r.requested_at),
            ", ".join(f"{n} {k}" for k, n in sorted(counts[r.id].items())),
            shorten(r.last_error, 40),
        )
        for r in rows
    ]
    print_table(header, lines)
    if not rows:
        print("(no requests)")
    return 0


def _state(record: CommitmentRecord) -> str:
    """``open`` split in two: waiting for its instances, or for the requester."""
    if record.status == CommitmentStatus.OPEN and record.settled_at is not None:
        return "open (report due)"
    return record.status.value


def _items(commitments: Commitments, record: CommitmentRecord) -> list[dict[str, Any]]:
    """The request's items; for one not settled yet, what it waits for now."""
    items = commitments.items(record.id)
    out = [i.to_json() for i in items]
    waiting = [n for n, i in enumerate(items) if i.result is None]
    if record.settled_at is None and waiting:
        found = commitments.deliveries([items[n].sop_instance_uid for n in waiting])
        for n in waiting:
            item = items[n]
            now = settle_item(item.sop_class_uid, found[item.sop_instance_uid], expired=False)
            out[n]["detail"] = (
                now.detail if now.result is None else f"next look: {now.detail or now.result.value}"
            )
    return out


def commitments_show(settings: Settings, args: argparse.Namespace) -> int:
    target = args.target.strip()
    state = open_state(settings, writable_spool=False)
    try:
        commitments = Commitments(state.engine)
        if target.isdigit():
            found = commitments.get(int(target))
            records = [found] if found is not None else []
        else:
            records = commitments.find(target)
        details = [{**r.to_json(), "items": _items(commitments, r)} for r in records]
    finally:
        state.close()
    if not records:
        what = "id" if target.isdigit() else "Transaction UID"
        print(f"stowaway: no storage commitment request with {what} {target}", file=sys.stderr)
        return 1
    if args.json:
        print_json(details[0] if target.isdigit() else details)
        return 0
    for n, (record, detail) in enumerate(zip(records, details, strict=True)):
        if n:
            print()
        width = max(len(k) for k in detail)
        for key, value in detail.items():
            if key != "items":
                shown = _state(record) if key == "status" else value
                print(f"{key:<{width}}  {'-' if shown is None else shown}")
        print("items:")
        for item in detail["items"]:
            reason = f" {item['failure_reason']}" if item["failure_reason"] else ""
            why = f"  ({item['detail']})" if item["detail"] else ""
            print(f"  {item['sop_instance_uid']}  {item['result'] or 'waiting'}{reason}{why}")
    return 0
