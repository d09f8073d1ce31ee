"""The C-STORE handler: spool durably, queue, and only then answer Success."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from stowaway.db.models import DEFAULT_DESTINATION, utcnow
from stowaway.db.part10 import (
    HeaderUIDs,
    NotDicomError,
    dataset_offset,
    part10_header,
    read_header_uids,
)
from stowaway.db.queue import EnqueueResult, NewInstance, Queue
from stowaway.db.spool import Spool, SpoolFile
from stowaway.receiver import incoming, status
from stowaway.receiver.group_commit import GroupCommit
from stowaway.receiver.routing import Arrival, RoutingTable, dataset_attributes
from stowaway.text import first_line

log = logging.getLogger("stowaway.receiver")


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE, for logs and metrics."""

    status: int
    seconds: float
    size_bytes: int


def _response(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[: status.ERROR_COMMENT_MAX]
    return ds


def _uid_refusal(
    uids: HeaderUIDs, sop_class_uid: str, sop_instance_uid: str
) -> tuple[int, str] | None:
    """Why a dataset's SOP UIDs cannot be stored under this C-STORE, or None.

    The dataset must carry both UIDs (STOW-RS and every later reader need them),
    and they must be the ones the C-STORE announced: a file whose meta, row and
    response name one instance while its dataset names another can never be
    told apart from a corrupt one.
    """
    if not uids.sop_class_uid:
        return status.MISSING_SOP_UID, "Dataset has no SOP Class UID (0008,0016)"
    if not uids.sop_instance_uid:
        return status.MISSING_SOP_UID, "Dataset has no SOP Instance UID (0008,0018)"
    if uids.sop_instance_uid != sop_instance_uid:
        return status.DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the C-STORE's"
    if uids.sop_class_uid != sop_class_uid:
        return status.DATASET_DOES_NOT_MATCH, "SOP Class UID differs from the C-STORE's"
    return None


class StoreHandler:
    """Handles ``evt.EVT_C_STORE`` with chunked receive (``event.dataset_path``).

    Order of work, each step a precondition of the next:

    1. read the few header UIDs (refuse with 0xC210 if unparsable),
    2. copy the sender's dataset bytes behind a deterministic file meta into
       ``spool/tmp``, fsync, rename into place, fsync the directory,
    3. insert the queue row and commit,
    4. answer 0x0000.

    Any failure answers a failure status with an ErrorComment, removes what
    was written, and leaves no row. Nothing escapes: an exception from a
    handler would make pynetdicom answer 0xC211 without a comment.
    """

    def __init__(
        self,
        spool: Spool,
        queue: Queue,
        node_id: str = "",
        is_accepting: Callable[[], str | None] = lambda: None,
        on_outcome: Callable[[StoreOutcome], None] = lambda _o: None,
        routing: RoutingTable | None = None,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.node_id = node_id
        # Where each instance goes, decided once, here; None: the default destination.
        self.routing = routing
        # Returns a reason when the receiver must refuse new instances (disk low, stopping).
        self.is_accepting = is_accepting
        self.on_outcome = on_outcome
        # Rows (and spool directory fsyncs) of concurrent associations share a commit.
        self.group_commit = GroupCommit(queue, spool)

    def __call__(self, event: Event) -> Dataset:
        started = time.perf_counter()
        size = 0
        try:
            response, size = self._store(event)
        except Exception:  # the last line of defence: never let pynetdicom answer 0xC211
            log.exception("store_unexpected_error")
            response = _response(status.OUT_OF_RESOURCES, "Internal error storing instance")
        self.on_outcome(StoreOutcome(int(response.Status), time.perf_counter() - started, size))
        return response

    def _store(self, event: Event) -> tuple[Dataset, int]:
        request = cast(C_STORE, event.request)
        assoc = event.assoc
        calling_aet = str(assoc.requestor.ae_title).strip()
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        fields = {"sop_instance_uid": sop_instance_uid, "calling_aet": calling_aet, "peer": peer}

        refusal = self.is_accepting()
        if refusal is not None:
            log.warning("store_refused", extra={**fields, "reason": refusal})
            return _response(status.OUT_OF_RESOURCES, refusal), 0

        source_path = Path(event.dataset_path)
        transfer_syntax = str(event.context.transfer_syntax)
        # Our own incoming file (receiver.incoming) already holds the spool file's
        # bytes, hash and the dataset's first bytes; None if pynetdicom wrote its own.
        streamed = incoming.lookup(source_path)
        try:
            received = streamed.finish() if streamed is not None else None
        except OSError as exc:
            log.error("spool_write_failed", extra={**fields, "error": str(exc)})
            return _response(status.OUT_OF_RESOURCES, f"Spool write failed: {exc.strerror}"), 0
        try:
            if received is not None:
                uids = read_header_uids(source_path, received.head, transfer_syntax)
            else:
                uids = read_header_uids(source_path)
        except NotDicomError as exc:
            log.warning("store_rejected", extra={**fields, "reason": str(exc)})
            return _response(status.CANNOT_UNDERSTAND, str(exc)), 0
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        unusable = _uid_refusal(uids, sop_class_uid, sop_instance_uid)
        if unusable is not None:
            code, comment = unusable
            log.warning(
                "store_rejected",
                extra={
                    **fields,
                    "reason": comment,
                    "dataset_sop_instance_uid": uids.sop_instance_uid,
                    "dataset_sop_class_uid": uids.sop_class_uid,
                },
            )
            return _response(code, comment), 0
        # From here on the request's and the dataset's UIDs are the same: logs,
        # the row, the spool file's meta and the response all name one instance.

        received_at = utcnow()
        try:
            if (
                streamed is not None
                and received is not None
                and received.deterministic
                and (received.sop_class_uid, received.sop_instance_uid)
                == (sop_class_uid, sop_instance_uid)
                and received.transfer_syntax_uid == transfer_syntax
            ):
                # Already the spool file: rename it into place, then fsync it (through
                # its open descriptor); the group commit fsyncs the directory before
                # the row is committed. Renaming first lets the file's fsync commit the
                # rename too on journaling file systems, leaving the directory's fsync
                # little to do. A crash before the commit leaves an orphan file and no
                # row, as a crash during a copy would (reconcile removes orphans).
                spooled = self.spool.adopt(
                    source_path, received.size_bytes, received.sha256, received_at, sync_dir=False
                )
                try:
                    streamed.sync()
                    streamed.close()
                except OSError:
                    self._discard(spooled)
                    raise
                directory_synced = False
            else:
                spooled = self._copy(
                    source_path, sop_class_uid, sop_instance_uid, transfer_syntax, received_at
                )
                directory_synced = True
        except NotDicomError as exc:
            return _response(status.CANNOT_UNDERSTAND, str(exc)), 0
        except OSError as exc:
            log.error("spool_write_failed", extra={**fields, "error": str(exc)})
            return _response(status.OUT_OF_RESOURCES, f"Spool write failed: {exc.strerror}"), 0

        destinations = self._route(event, spooled, fields)
        try:
            result = self.group_commit.enqueue(
                NewInstance(
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    study_instance_uid=uids.study_instance_uid,
                    series_instance_uid=uids.series_instance_uid,
                    transfer_syntax_uid=transfer_syntax,
                    calling_aet=calling_aet,
                    called_aet=str(assoc.acceptor.ae_title).strip(),
                    peer_address=peer,
                    spool_path=spooled.relative_path,
                    size_bytes=spooled.size_bytes,
                    sha256=spooled.sha256,
                    node_id=self.node_id,
                    destinations=destinations,
                ),
                sync_dir=not directory_synced,
            )
        except OSError as exc:
            self._discard(spooled)
            log.error("spool_write_failed", extra={**fields, "error": str(exc)})
            return _response(status.OUT_OF_RESOURCES, f"Spool write failed: {exc.strerror}"), 0
        except SQLAlchemyError as exc:
            self._discard_unless_queued(spooled)
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.error("enqueue_failed", extra={**fields, "error": error})
            return _response(status.OUT_OF_RESOURCES, "Queue database unavailable"), 0
        return self._stored(fields, uids.study_instance_uid, transfer_syntax, spooled, result)

    def _route(self, event: Event, spooled: SpoolFile, fields: dict[str, str]) -> tuple[str, ...]:
        """The destinations the rules choose for this instance (empty: unrouted).

        Data set attributes are read from the spool file only when a rule tests one,
        and then only the tags rules test (pixel data is never read).
        """
        if self.routing is None:
            return (DEFAULT_DESTINATION,)
        table = self.routing
        assoc = event.assoc
        path = self.spool.absolute(spooled.relative_path)
        header: list[Dataset] = []

        def attribute(tag: BaseTag) -> tuple[str, ...]:
            if not header:
                header.append(_read_routing_header(path, table.tested_tags, fields))
            return dataset_attributes(header[0])(tag)

        arrival = Arrival(
            attribute=attribute,
            calling_aet=fields["calling_aet"],
            called_aet=str(assoc.acceptor.ae_title).strip(),
            peer_address=str(assoc.requestor.address),
        )
        route = table.route(arrival)
        if route.unrouted:
            log.warning("instance_unrouted", extra={**fields, "reason": "no rule matched"})
        return route.destinations

    def _copy(
        self,
        source_path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        received_at: datetime,
    ) -> SpoolFile:
        """Copy the sender's dataset behind a deterministic file meta (fsynced, renamed)."""
        with source_path.open("rb") as source:
            source.seek(dataset_offset(source))
            header = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax)
            return self.spool.write(header, source, received_at)

    def _stored(
        self,
        fields: dict[str, str],
        study_instance_uid: str,
        transfer_syntax: str,
        spooled: SpoolFile,
        result: EnqueueResult,
    ) -> tuple[Dataset, int]:
        """The row is committed: tidy up, log, answer Success."""
        for replaced in result.replaced_spool_paths:
            self._remove_quietly(replaced)
        log.info(
            "instance_stored",
            extra={
                **fields,
                "row_id": result.id,
                "study_instance_uid": study_instance_uid,
                "size_bytes": spooled.size_bytes,
                "transfer_syntax": transfer_syntax,
                "replaced": result.replaced_spool_path is not None,
                "deliveries": len(result.ids) or 1,
            },
        )
        return _response(status.SUCCESS), spooled.size_bytes

    def _discard(self, spooled: SpoolFile) -> None:
        self._remove_quietly(spooled.relative_path)

    def _discard_unless_queued(self, spooled: SpoolFile) -> None:
        """After a failed commit, remove the file only if no row points at it.

        A connection lost during COMMIT leaves the outcome unknown: the row may
        exist. Deleting its file would turn it into a broken row; keeping a file
        with no row is harmless (reconcile removes orphans).
        """
        try:
            queued = self.queue.references(spooled.relative_path)
        except SQLAlchemyError:
            log.warning("commit_outcome_unknown", extra={"spool_path": spooled.relative_path})
            return
        if not queued:
            self._discard(spooled)

    def _remove_quietly(self, relative_path: str) -> None:
        try:
            self.spool.remove(relative_path)
        except OSError as exc:
            # reconcile finds it later; the sender's answer does not depend on it
            log.warning(
                "spool_remove_failed", extra={"spool_path": relative_path, "error": str(exc)}
            )


def _read_routing_header(path: Path, tags: frozenset[BaseTag], fields: dict[str, str]) -> Dataset:
    """The top-level elements routing rules test, from the spool file; an empty data set
    (no attribute rule matches) when it cannot be read."""
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=sorted(tags))
    except Exception as exc:  # a rule must not fail the C-STORE: the row stays visible
        log.warning("routing_header_unreadable", extra={**fields, "error": first_line(exc)})
        return Dataset()
