"""The operator's queue views and actions, shared by ``stowaway queue`` and the HTTP API.

Both front ends choose rows the same way (the selections here, with the same rules
and the same messages) and get the same results (the dictionaries here are what
``stowaway queue ... --json`` prints). The work is done by :mod:`stowaway.db.queue`
in chunks of ``Queue.OPERATOR_CHUNK`` ids per transaction, each change guarded by
the state the row must be in, so every action is safe while ``serve`` runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom import dcmread
from pydicom.tag import BaseTag

from stowaway.db.models import DEFAULT_DESTINATION, Status, utcnow
from stowaway.db.queue import DestinationStatus, Queue, QueuedInstance, QueueStats
from stowaway.db.spool import Spool
from stowaway.destinations import DestinationConfig
from stowaway.receiver.routing import Arrival, dataset_attributes
from stowaway.runtime import State

#: ``on_progress(done, total)``: rows handled so far by a long action.
OnProgress = Callable[[int, int], None]
#: How a front end spells a selector in its messages (``failed`` -> ``--failed``).
Spelling = Callable[[str], str]


def cli_spelling(name: str) -> str:
    return "--" + name.replace("_", "-")


class SelectionError(ValueError):
    """Rows chosen in a way that makes no sense (a CLI usage error, an HTTP 422)."""


# ---------------------------------------------------------------------- values


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest age a selector takes (a hundred years: anything older is everything).
MAX_AGE = timedelta(days=36500)


def parse_status(value: str) -> Status:
    """A queue status by its name."""
    try:
        return Status(value)
    except ValueError:
        raise ValueError(
            f"unknown status {value!r}; one of {', '.join(s.value for s in Status)}"
        ) from None


def parse_age(value: str) -> timedelta:
    """``30s``, ``5m``, ``2h``, ``7d``, ``1w`` (a unit is required: ``7`` is ambiguous)."""
    match = _DURATION.fullmatch(value)
    if not match:
        raise ValueError(f"a duration such as 30s, 5m, 2h or 7d (got {value!r})")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_AGE.total_seconds():
        raise ValueError(f"a duration of at most {MAX_AGE.days} days (got {value!r})")
    return timedelta(seconds=seconds)


def parse_since(value: str) -> datetime:
    """A duration ago (``2h``) or an ISO 8601 date/time; without an offset it is UTC."""
    if _DURATION.fullmatch(value):
        return utcnow() - parse_age(value)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"an ISO date/time such as 2026-01-31 or 2026-01-31T08:00, "
            f"or a duration ago such as 2h or 7d (got {value!r})"
        ) from None
    try:
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"a date/time within years 1 to 9999 (got {value!r})") from None


# ---------------------------------------------------------------------- selections


def _one_way(ids: Sequence[int], flags: Mapping[str, bool], spell: Spelling) -> None:
    """Exactly one way of choosing rows: IDs or one of ``flags``."""
    chosen = [spell(name) for name, on in flags.items() if on]
    if ids and chosen:
        raise SelectionError(f"give row IDs or {' / '.join(chosen)}, not both")
    if len(chosen) > 1:
        raise SelectionError(f"{' and '.join(chosen)} cannot be combined")
    if not ids and not chosen:
        raise SelectionError(f"say which rows: row IDs, or {' / '.join(map(spell, flags))}")


@dataclass(frozen=True)
class RequeueSelection:
    """Rows by ID, every ``failed`` row, or every row in ``status`` (optionally one study);
    optionally only one destination's."""

    ids: tuple[int, ...] = ()
    failed: bool = False
    status: Status | None = None
    study: str | None = None
    destination: str | None = None

    def check(self, spell: Spelling = cli_spelling) -> None:
        _one_way(self.ids, {"failed": self.failed, "status": self.status is not None}, spell)
        if self.study is not None and self.ids:
            raise SelectionError(
                f"{spell('study')} selects rows together with {spell('failed')} or "
                f"{spell('status')}, not with IDs"
            )

    @property
    def statuses(self) -> list[Status] | None:
        return [Status.FAILED] if self.failed else [self.status] if self.status else None


@dataclass(frozen=True)
class PurgeSelection:
    """Rows by ID, every ``failed`` or every ``done`` row, optionally only those older
    than an age and of one destination."""

    ids: tuple[int, ...] = ()
    failed: bool = False
    done: bool = False
    older_than: timedelta | None = None
    destination: str | None = None

    def check(self, spell: Spelling = cli_spelling) -> None:
        _one_way(self.ids, {"failed": self.failed, "done": self.done}, spell)

    @property
    def statuses(self) -> list[Status] | None:
        return [Status.FAILED] if self.failed else [Status.DONE] if self.done else None


@dataclass(frozen=True)
class ListSelection:
    """What ``queue ls`` and ``GET /api/v1/instances`` filter on."""

    status: Status | None = None
    destination: str | None = None
    study: str | None = None
    sop: str | None = None
    since: datetime | None = None


def list_rows(
    queue: Queue, selection: ListSelection, limit: int | None, after_id: int = 0
) -> list[QueuedInstance]:
    """Rows matching ``selection``, by id, after ``after_id`` (keyset paging)."""
    return queue.rows(
        status=selection.status,
        limit=limit,
        study_instance_uid=selection.study,
        since=selection.since,
        destination=selection.destination,
        sop_instance_uid=selection.sop,
        after_id=after_id,
    )


# ---------------------------------------------------------------------- views


def instance_details(queue: Queue, spool: Spool, row: QueuedInstance) -> dict[str, Any]:
    """One row with its spool file's state and its history (``queue show --json``)."""
    out = row.to_json()
    try:
        path = spool.absolute(row.spool_path)
        absolute, present = str(path), path.is_file()
    except ValueError as exc:
        absolute, present = f"({exc})", False
    problem = spool.verify(row.spool_path, row.size_bytes, row.sha256)
    out["spool_file"] = {
        "absolute_path": absolute,
        "present": present,
        "intact": problem is None,
        "problem": problem,
    }
    out["events"] = [
        {"at": at.isoformat(), "kind": kind, "detail": detail}
        for at, kind, detail in queue.events(row.id)
    ]
    return out


def _destination_json(
    name: str, url: str, status: DestinationStatus | None, stats: QueueStats
) -> dict[str, Any]:
    counts = {
        "pending": stats.counts[Status.PENDING] + stats.counts[Status.IN_FLIGHT],
        "failed": stats.counts[Status.FAILED],
        "oldest_pending_received_at": (
            stats.oldest_pending_received_at.isoformat()
            if stats.oldest_pending_received_at
            else None
        ),
    }
    if status is None:
        return {
            "name": name,
            **counts,
            "url": url,
            "state": "unknown",
            "since": None,
            "reason": None,
            "next_probe_at": None,
        }
    return {
        "name": name,
        **counts,
        "url": status.url or url,
        "state": status.state.value,
        "since": status.since.isoformat(),
        "reason": status.reason,
        "next_probe_at": status.next_probe_at.isoformat() if status.next_probe_at else None,
    }


def queue_summary(queue: Queue, dicomweb_url: str | None = None) -> dict[str, Any]:
    """Counts and bytes per status (the kept counts, exact, never a count of the table),
    oldest pending, each destination's state and the last hour (``queue stats --json``).
    ``dicomweb_url``: only the destination named ``default`` at that URL."""
    by_destination = queue.stats_by_destination()
    stats = QueueStats.total(list(by_destination.values()))
    recorded = {d.name: d for d in queue.list_destinations()}
    names = sorted(set(recorded) | {n for n in by_destination if n})
    urls = {n: (recorded[n].url if n in recorded else "") for n in names}
    if dicomweb_url is not None:
        # --dicomweb-url alone is the destination named "default"; what was recorded
        # for another URL under that name says nothing about this one.
        names, urls = [DEFAULT_DESTINATION], {DEFAULT_DESTINATION: dicomweb_url}
        known = recorded.get(DEFAULT_DESTINATION)
        if known is not None and known.url and known.url != dicomweb_url:
            del recorded[DEFAULT_DESTINATION]
    none = QueueStats.total([])
    destinations = [
        _destination_json(n, urls[n], recorded.get(n), by_destination.get(n, none)) for n in names
    ]
    last_hour = queue.activity_since(utcnow() - timedelta(hours=1))
    oldest = stats.oldest_pending_received_at
    age = (utcnow() - oldest).total_seconds() if oldest else None
    return {
        **{status.value: stats.counts[status] for status in Status},
        "bytes": {status.value: stats.bytes[status] for status in Status},
        "oldest_pending_age_seconds": age,
        "bytes_waiting": stats.bytes[Status.PENDING] + stats.bytes[Status.IN_FLIGHT],
        "destinations": destinations,
        "last_hour": last_hour,
    }


# ---------------------------------------------------------------------- actions


def _chunks(ids: Sequence[int], size: int) -> list[Sequence[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def requeue(
    state: State,
    selection: RequeueSelection,
    node_id: str,
    *,
    spell: Spelling = cli_spelling,
    on_progress: OnProgress | None = None,
) -> dict[str, list[int]]:
    """Back to pending, due now, attempts reset: ``requeued``, ``superseded``, ``leased``,
    ``file_gone`` and ``not_found`` ids. Raises :class:`SelectionError`."""
    selection.check(spell)
    ids = state.queue.select_ids(
        ids=list(selection.ids) or None,
        statuses=selection.statuses,
        study_instance_uid=selection.study,
        destination=selection.destination,
    )
    # An unrouted row has no destination to be pending for: reroute is its way on.
    unrouted = state.queue.select_ids(ids=ids, statuses=[Status.UNROUTED]) if ids else []
    if unrouted and selection.ids:
        raise SelectionError(f"rows {unrouted} are unrouted: use stowaway queue reroute")
    ids = [i for i in ids if i not in set(unrouted)]
    out: dict[str, list[int]] = {"requeued": [], "superseded": [], "leased": [], "file_gone": []}
    done = 0
    for chunk in _chunks(ids, state.queue.OPERATOR_CHUNK):
        # A done row's file is normally deleted after its upload: requeueing it would
        # only fail again. Other nodes' files are on their own volumes: not checked.
        gone = set()
        for row_id in state.queue.select_ids(ids=chunk, statuses=[Status.DONE], node_id=node_id):
            row = state.queue.get(row_id)
            if row is not None and state.spool.verify(row.spool_path, row.size_bytes, row.sha256):
                gone.add(row_id)
        out["file_gone"].extend(sorted(gone))
        wanted = [row_id for row_id in chunk if row_id not in gone]
        if wanted:
            for key, values in asdict(state.queue.requeue(wanted)).items():
                out[key].extend(values)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, len(ids))
    out["not_found"] = sorted(set(selection.ids) - set(ids))
    return out


def purge_candidates(
    queue: Queue, selection: PurgeSelection, *, spell: Spelling = cli_spelling
) -> tuple[list[int], list[int]]:
    """The ids ``purge`` would delete and the asked-for ids not found; raises
    :class:`SelectionError`."""
    selection.check(spell)
    older_than = utcnow() - selection.older_than if selection.older_than is not None else None
    ids = queue.select_ids(
        ids=list(selection.ids) or None,
        statuses=selection.statuses,
        older_than=older_than,
        destination=selection.destination,
    )
    return ids, sorted(set(selection.ids) - set(ids))


def purge(
    state: State,
    ids: Sequence[int],
    statuses: Sequence[Status] | None,
    *,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Delete rows, then their spool files: ``deleted``, ``bytes``, ``files_removed``,
    ``file_errors``.

    Rows first (committed), then their files: a crash in between leaves orphan files
    for ``reconcile``, never a row pointing at a missing file.
    """
    out: dict[str, Any] = {"deleted": [], "bytes": 0, "files_removed": 0, "file_errors": []}
    done = 0
    for chunk in _chunks(ids, state.queue.OPERATOR_CHUNK):
        purged = state.queue.purge(chunk, statuses)
        out["deleted"].extend(purged.deleted)
        out["bytes"] += purged.size_bytes
        for path in purged.unreferenced_paths:
            try:
                existed = state.spool.absolute(path).exists()
                state.spool.remove(path)
            except (OSError, ValueError) as exc:
                out["file_errors"].append(f"{path}: {exc}")
                continue
            out["files_removed"] += int(existed)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, len(ids))
    return out


def purge_json(
    result: dict[str, Any], ids: Sequence[int], not_found: Sequence[int]
) -> dict[str, Any]:
    """What ``queue purge --json`` prints for a purge of ``ids``."""
    return {
        "purged": len(result["deleted"]),
        "bytes": result["bytes"],
        "files_removed": result["files_removed"],
        "file_errors": result["file_errors"],
        "skipped": sorted(set(ids) - set(result["deleted"])),
        "not_found": list(not_found),
    }


def reroute(
    state: State, config: DestinationConfig, ids: Sequence[int], *, dry_run: bool
) -> dict[str, Any]:
    """Route unrouted rows (by ID, or all) with the rules as they are now:
    ``rows`` (each with its ``destinations``, and what was ``created``/``skipped``),
    ``dry_run`` and ``not_found``."""
    found = state.queue.select_ids(ids=list(ids) or None, statuses=[Status.UNROUTED])
    plan: list[dict[str, Any]] = []
    for row_id in found:
        row = state.queue.get(row_id)
        if row is None:
            continue
        route = config.routing.route(stored_arrival(state.spool, row))
        entry: dict[str, Any] = {"id": row_id, "destinations": list(route.destinations)}
        if not dry_run and route.destinations:
            done = state.queue.reroute(row_id, route.destinations)
            entry.update(created=list(done.created), skipped=list(done.skipped))
        plan.append(entry)
    return {"rows": plan, "dry_run": dry_run, "not_found": sorted(set(ids) - set(found))}


def stored_arrival(spool: Spool, row: QueuedInstance) -> Arrival:
    """What routing saw when the instance arrived, from its row and spool file."""

    def attribute(tag: BaseTag) -> tuple[str, ...]:
        try:
            dataset = dcmread(spool.absolute(row.spool_path), stop_before_pixels=True)
        except Exception:  # an unreadable file matches no attribute rule
            return ()
        return dataset_attributes(dataset)(tag)

    return Arrival(
        attribute=attribute,
        calling_aet=row.calling_aet,
        called_aet=row.called_aet,
        peer_address=row.peer_address.rsplit(":", 1)[0],
    )
