"""C-FIND, C-MOVE and C-GET SCPs answered from a DICOMweb store (QIDO-RS and WADO-RS).

The event handlers follow pynetdicom's protocol for EVT_C_FIND / EVT_C_MOVE / EVT_C_GET
(generators: a C-FIND handler yields ``(status, identifier)``; a C-MOVE handler yields the
destination, then the number of sub-operations, then one ``(Pending, dataset)`` per
instance; C-GET the same without the destination). pynetdicom then sends the C-STOREs and
puts the remaining/completed/failed/warning counts in each response's command set.

* C-FIND streams: each Pending response goes out as soon as its QIDO-RS page arrived; a
  C-CANCEL stops the paging.
* C-MOVE and C-GET first page through the IMAGE-level search (pynetdicom needs the count
  of sub-operations before the first one), keeping only the four UIDs of each instance,
  at most ``max_results`` of them; then each instance is fetched with WADO-RS into a
  temporary file and handed to pynetdicom read lazily from there. C-MOVE sends them all on
  one association to the destination the AE dictionary names.
* Nothing here touches the store-and-forward queue: retrieved instances are not uploaded
  again.

What pynetdicom's protocol cannot express (an ErrorComment on a failure before any
sub-operation, ``--dimse_cmove_aet``, sending an instance from its file) goes through
:mod:`receiver.retrieve_hooks`, the one module that relies on pynetdicom's internals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from stowaway.dicomweb.client import DicomwebError, DicomwebReader
from stowaway.receiver.aet_dictionary import MoveDestination
from stowaway.receiver.qido_query import (
    OUT_OF_RESOURCES,
    InformationModel,
    InstanceRef,
    Level,
    QidoQuery,
    QueryError,
    instance_ref,
    to_identifier,
    translate,
)
from stowaway.receiver.retrieve_hooks import FinalStatuses, sending_files, sub_operation_ae
from stowaway.text import first_line

log = logging.getLogger("stowaway.query")

# -- DIMSE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4; PS3.7 C) -----------------
SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00
CANCEL: Final = 0xFE00
NOT_AUTHORIZED: Final = 0x0124
PROCESSING_FAILURE: Final = 0x0110
#: C-MOVE/C-GET: out of resources, unable to calculate the number of matches.
UNABLE_TO_CALCULATE_MATCHES: Final = 0xA701
#: C-MOVE/C-GET: out of resources, unable to perform sub-operations.
UNABLE_TO_PERFORM_SUBOPERATIONS: Final = 0xA702
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
#: C-FIND: unable to process.
UNABLE_TO_PROCESS: Final = 0xC000
#: pynetdicom sends up to this many sub-operations (the counts are US).
MAX_SUBOPERATIONS: Final = 65535
#: ErrorComment is LO: 64 characters.
ERROR_COMMENT_LIMIT: Final = 64

MODELS: Final[Mapping[str, InformationModel]] = {
    PatientRootQueryRetrieveInformationModelFind: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: InformationModel.STUDY_ROOT,
}
#: The abstract syntaxes the receiver's AE supports for query/retrieve. C-GET's storage
#: contexts need nothing more: the receiver's unrestricted storage service accepts every
#: storage class and answers SCP/SCU role selection (pynetdicom's negotiate_unrestricted).
CONTEXTS: Final = tuple(MODELS)

#: Transfer syntaxes proposed, per SOP class, on a C-MOVE's association.
_UNCOMPRESSED: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_COMPRESSED: Final = (JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless, JPEG2000, RLELossless)
_MAX_CONTEXTS: Final = 128
#: Elements larger than this are read from the temporary file only when sent.
_DEFER_SIZE: Final = "64 KB"

DenialExplainer = Callable[[int, bytes], str]


@dataclass(frozen=True)
class QueryLimits:
    """Bounds on what one peer may make the gateway do."""

    #: Queries and retrieves running at once per peer address.
    max_per_peer: int = 2
    #: Matches one C-FIND may return, instances one C-MOVE/C-GET may send.
    max_results: int = 10_000
    #: QIDO-RS ``limit``: results per page.
    page_size: int = 500
    #: QIDO-RS searches one identifier may fan out into (UID lists).
    max_searches: int = 1000


class PeerSlots:
    """Counts the queries and retrieves running per peer address."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, peer: str) -> bool:
        with self._lock:
            if self._running.get(peer, 0) >= self.limit:
                return False
            self._running[peer] = self._running.get(peer, 0) + 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            left = self._running.get(peer, 1) - 1
            if left:
                self._running[peer] = left
            else:
                self._running.pop(peer, None)


def status_dataset(status: int, comment: str) -> Dataset:
    """A status with its ErrorComment, as pynetdicom copies it into the response."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:ERROR_COMMENT_LIMIT]
    return ds


class QueryRetrieveService:
    """The C-FIND/C-MOVE/C-GET event handlers over one DICOMweb store.

    ``explain_denied(status, body)`` turns a 401/403 answer into its cause in plain words
    (the composition layer passes the forwarder's); ``work_dir`` holds an instance while
    it is being sent.
    """

    def __init__(
        self,
        reader: DicomwebReader,
        *,
        aet: str,
        limits: QueryLimits,
        destinations: Mapping[str, MoveDestination],
        work_dir: Path,
        cmove_aet: str | None = None,
        explain_denied: DenialExplainer | None = None,
    ) -> None:
        self.reader = reader
        self.aet = aet
        self.limits = limits
        self.destinations = dict(destinations)
        self.work_dir = work_dir
        self.cmove_aet = cmove_aet if cmove_aet and cmove_aet != aet else None
        self.explain_denied = explain_denied
        self.slots = PeerSlots(limits.max_per_peer)
        self._final = FinalStatuses()

    @property
    def contexts(self) -> tuple[str, ...]:
        return CONTEXTS

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The handlers to bind on the receiver's listeners."""
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    # ------------------------------------------------------------------ C-FIND

    def on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """EVT_C_FIND: Pending per match as the pages arrive, then pynetdicom's Success."""
        peer = _peer(event)
        if not self.slots.take(peer):
            yield self._busy(event, "c_find"), None
            return
        matches = 0
        try:
            query = self._query(event, None)
            seen: set[tuple[str, ...]] = set()
            for result in self._results(query):
                if event.is_cancelled:
                    log.info("c_find_cancelled", extra={"peer": peer, "matches": matches})
                    yield CANCEL, None
                    return
                key = query.answer_key(result)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                matches += 1
                if matches > self.limits.max_results:
                    yield self._too_many(event, "c_find"), None
                    return
                yield PENDING, to_identifier(result, query, retrieve_aet=self.aet)
            log.info(
                "c_find_done",
                extra={"peer": peer, "level": query.level.value, "matches": matches},
            )
        except QueryError as exc:
            yield self._refused(event, "c_find", exc.status, str(exc)), None
        except DicomwebError as exc:
            yield self._store_failed(event, "c_find", exc, UNABLE_TO_PROCESS), None
        finally:
            self.slots.release(peer)

    # ------------------------------------------------------------------ C-MOVE

    def on_move(self, event: Event) -> Iterator[Any]:
        """EVT_C_MOVE: destination, count, then one Pending dataset per instance."""
        peer = _peer(event)
        name = (event.move_destination or "").strip()
        if not self.slots.take(peer):
            self._final.amend(event, self._busy(event, "c_move"))
            yield None, None
            return
        try:
            destination = self.destinations.get(name)
            if destination is None:
                comment = f"Unknown move destination {name[:16]}: not in --aet-dictionary"
                log.warning(
                    "c_move_refused",
                    extra={"peer": peer, "destination": name, "reason": "unknown destination"},
                )
                self._final.amend(event, status_dataset(MOVE_DESTINATION_UNKNOWN, comment))
                yield None, None
                return
            refs = self._instances_or_amend(event, "c_move")
            if refs is None:
                yield None, None  # answered with the amended status
                return
            log.info(
                "c_move_started",
                extra={
                    "peer": peer,
                    "destination": name,
                    "address": f"{destination.host}:{destination.port}",
                    "instances": len(refs),
                },
            )
            yield destination.host, destination.port, {"contexts": move_contexts(refs)}
            if not refs:
                yield 0  # pynetdicom answers Success with no sub-operations, associating not
                return
            # If the association cannot be made, pynetdicom answers a bare 0xA801.
            self._final.amend(
                event,
                status_dataset(
                    MOVE_DESTINATION_UNKNOWN,
                    f"Move destination {name[:16]} refused or unreachable",
                ),
            )
            with sub_operation_ae(event.assoc, self.cmove_aet):
                yield len(refs)
            self._final.forget(event)
            yield from self._sub_operations(event, refs, "c_move")
        finally:
            self.slots.release(peer)

    # ------------------------------------------------------------------ C-GET

    def on_get(self, event: Event) -> Iterator[Any]:
        """EVT_C_GET: count, then one Pending dataset per instance, on this association."""
        peer = _peer(event)
        if not self.slots.take(peer):
            self._final.amend(event, self._busy(event, "c_get"))
            yield 0
            return
        try:
            refs = self._instances_or_amend(event, "c_get")
            if refs is None:
                yield 0  # answered with the amended status
                return
            log.info("c_get_started", extra={"peer": peer, "instances": len(refs)})
            yield len(refs)
            with sending_files(event.assoc):
                yield from self._sub_operations(event, refs, "c_get")
        finally:
            self.slots.release(peer)

    # ------------------------------------------------------------------ retrieve

    def _instances_or_amend(self, event: Event, what: str) -> list[InstanceRef] | None:
        """The instances the identifier names; None once the failure to send is recorded."""
        try:
            query = self._query(event, Level.IMAGE)
            refs: list[InstanceRef] = []
            seen: set[str] = set()
            limit = min(self.limits.max_results, MAX_SUBOPERATIONS)
            for result in self._results(query):
                if event.is_cancelled:
                    self._final.amend(event, status_dataset(CANCEL, "Cancelled while searching"))
                    return None
                ref = instance_ref(result)
                if ref is None or ref.sop_instance in seen:
                    continue
                seen.add(ref.sop_instance)
                refs.append(ref)
                if len(refs) > limit:
                    self._final.amend(
                        event, self._too_many(event, what, UNABLE_TO_CALCULATE_MATCHES)
                    )
                    return None
            return refs
        except QueryError as exc:
            self._final.amend(event, self._refused(event, what, exc.status, str(exc)))
        except DicomwebError as exc:
            self._final.amend(
                event, self._store_failed(event, what, exc, UNABLE_TO_CALCULATE_MATCHES)
            )
        return None

    def _sub_operations(
        self, event: Event, refs: list[InstanceRef], what: str
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """One Pending (dataset) per instance; a store failure ends the retrieve."""
        failed: list[str] = []
        peer = _peer(event)
        for ref in refs:
            if event.is_cancelled:
                log.info(f"{what}_cancelled", extra={"peer": peer})
                yield CANCEL, _failed_list(failed)
                return
            with self._fetched(ref) as fetched:
                if isinstance(fetched, DicomwebError):
                    if _store_is_down(fetched):
                        yield (
                            self._store_failed(
                                event, what, fetched, UNABLE_TO_PERFORM_SUBOPERATIONS
                            ),
                            _failed_list([*failed, ref.sop_instance]),
                        )
                        return
                    log.warning(
                        f"{what}_instance_failed",
                        extra={"peer": peer, "error": first_line(fetched)},
                    )
                    failed.append(ref.sop_instance)
                    yield PENDING, _unsendable(ref)
                    continue
                yield PENDING, fetched
        log.info(f"{what}_done", extra={"peer": peer, "instances": len(refs)})

    @contextlib.contextmanager
    def _fetched(self, ref: InstanceRef) -> Iterator[Dataset | DicomwebError]:
        """The instance read lazily from a temporary file (removed afterwards), or the error."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.work_dir, suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as sink:
                self.reader.retrieve_instance(ref.study, ref.series, ref.sop_instance, sink)
            dataset = dcmread(name, defer_size=_DEFER_SIZE)
        except DicomwebError as exc:
            yield exc
        except (OSError, ValueError) as exc:  # pydicom's InvalidDicomError is a ValueError
            yield DicomwebError(f"instance unreadable: {first_line(exc)}", status=200)
        else:
            yield dataset
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    # ------------------------------------------------------------------ shared

    def _query(self, event: Event, level: Level | None) -> QidoQuery:
        model = MODELS.get(str(event.request.AffectedSOPClassUID))
        if model is None:
            raise QueryError("not a query/retrieve SOP class this gateway serves")
        try:
            identifier = event.identifier
            return translate(identifier, model, level=level, max_searches=self.limits.max_searches)
        except QueryError:
            raise
        except Exception as exc:  # pydicom decodes lazily: any element may fail here
            raise QueryError(f"identifier undecodable: {first_line(exc)}") from None

    def _results(self, query: QidoQuery) -> Iterator[dict[str, Any]]:
        for search in query.searches:
            for page in self.reader.search(
                query.resource, list(search), page_size=self.limits.page_size
            ):
                yield from page

    def _busy(self, event: Event, what: str) -> Dataset:
        limit = self.limits.max_per_peer
        log.warning(f"{what}_refused", extra={"peer": _peer(event), "reason": "busy"})
        return status_dataset(OUT_OF_RESOURCES, f"{limit} queries running (--query-max-per-peer)")

    def _too_many(self, event: Event, what: str, status: int = OUT_OF_RESOURCES) -> Dataset:
        limit = self.limits.max_results
        log.warning(
            f"{what}_truncated",
            extra={"peer": _peer(event), "reason": f"more than {limit} matches"},
        )
        return status_dataset(status, f"Over {limit} matches (--query-max-results)")

    def _refused(self, event: Event, what: str, status: int, reason: str) -> Dataset:
        log.warning(f"{what}_refused", extra={"peer": _peer(event), "reason": reason})
        return status_dataset(status, reason)

    def _store_failed(self, event: Event, what: str, exc: DicomwebError, status: int) -> Dataset:
        """The DIMSE failure for a QIDO-RS/WADO-RS failure, its cause in the ErrorComment."""
        reason = str(exc)
        if exc.status in (401, 403):
            status = NOT_AUTHORIZED
            if self.explain_denied is not None:
                reason = self.explain_denied(exc.status, exc.body)
        elif exc.status is None or exc.status in (429, 502, 503, 504):
            status = OUT_OF_RESOURCES if status == UNABLE_TO_PROCESS else status
        if exc.status is None and "timed out" in reason:
            reason = f"{reason} (--query-timeout)"
        log.error(
            f"{what}_store_failed",
            extra={"peer": _peer(event), "http_status": exc.status, "reason": reason},
        )
        return status_dataset(status, f"Store: {reason}")


def move_contexts(refs: list[InstanceRef]) -> list[PresentationContext]:
    """Storage contexts for a C-MOVE's association, one transfer syntax each.

    One syntax per context, so that the destination accepts each it can take, and an
    instance finds a context in its syntax as stored (sent from its file, unchanged):
    every SOP class uncompressed first, then in the common compressed syntaxes while the
    128 contexts of an association allow.
    """
    classes = list(dict.fromkeys(ref.sop_class for ref in refs))
    contexts: list[PresentationContext] = []
    for syntaxes in (_UNCOMPRESSED, _COMPRESSED):
        for syntax in syntaxes:
            for uid in classes:
                if len(contexts) >= _MAX_CONTEXTS:
                    return contexts
                contexts.append(build_context(uid, [syntax]))
    return contexts


def _peer(event: Event) -> str:
    return str(event.assoc.requestor.address)


def _store_is_down(exc: DicomwebError) -> bool:
    """No answer, or one saying to come back later: the next instance would fail too."""
    return exc.status is None or exc.status in (401, 403, 429, 500, 502, 503, 504)


def _failed_list(uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds


def _unsendable(ref: InstanceRef) -> Dataset:
    """What makes pynetdicom count a failed sub-operation for ``ref``.

    pynetdicom counts failures only from its C-STORE attempts; a dataset without a SOP
    Class UID makes the attempt fail before anything is sent, and pynetdicom then lists
    the SOP Instance UID as failed.
    """
    ds = Dataset()
    ds.SOPInstanceUID = ref.sop_instance
    return ds
