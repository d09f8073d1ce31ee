"""Storage Commitment Push Model SCP (PS3.4 Annex J): the N-ACTION side.

An N-ACTION with Action Type 1 (Request Storage Commitment, J.3.2.1) is recorded in
the queue database, its Transaction UID and each Referenced SOP Sequence item, before it
is answered Success: a Success promises that the request will be reported on
(J.3.2.1.3), and a restart must not forget it. The report itself is sent by
:mod:`receiver.commitment_reporter` once every item is settled.

What is answered, besides Success:

* a requester (calling AE title) that is not in the AE dictionary: 0x0110 with
  ErrorComment "Unknown AET", as Google's adapter answers: the report may have to go on a
  new association (J.3.3.1.2), and only the dictionary says where;
* an Action Type other than 1: 0x0123 (no such action); a Requested SOP Instance UID
  other than the well-known one (J.3.5): 0x0117 (invalid object instance);
* Action Information without a Transaction UID or Referenced SOP Sequence, or with an
  item lacking a UID: 0x0115 (invalid argument value), with what is wrong;
* more than ``max_items`` items: 0x0213 (resource limitation);
* the same Transaction UID from the same requester with other items: 0x0115; the same
  request again is answered Success and recorded once (:class:`db.commitments.Recorded`);
* the queue database unreachable: 0x0110 with the reason (the requester may try again).

The association the N-ACTION came on is remembered (:class:`OpenAssociations`) so that
the report can go back on it while it is open (J.3.3.1.2 note 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError

from stowaway.db.commitments import CommitmentRequest, Commitments, Recorded, RequestedItem
from stowaway.text import first_line

log = logging.getLogger("stowaway.commitment")

#: The well-known SOP Instance of the Push Model (PS3.4 J.3.5).
PUSH_MODEL_INSTANCE: Final = "1.2.840.10008.1.20.1.1"
#: Action Type ID "Request Storage Commitment" (J.3.2.1.1).
REQUEST_STORAGE_COMMITMENT: Final = 1

SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110
INVALID_OBJECT_INSTANCE: Final = 0x0117
INVALID_ARGUMENT_VALUE: Final = 0x0115
NO_SUCH_ACTION: Final = 0x0123
RESOURCE_LIMITATION: Final = 0x0213

#: Items one request may reference (each costs a row and a line of the report).
DEFAULT_MAX_ITEMS: Final = 50_000


class OpenAssociations:
    """The association each request arrived on, while it is open (this process only)."""

    def __init__(self) -> None:
        self._by_commitment: dict[int, Association] = {}
        self._lock = threading.Lock()

    def add(self, commitment_id: int, assoc: Association) -> None:
        with self._lock:
            self._by_commitment = {k: a for k, a in self._by_commitment.items() if a.is_established}
            self._by_commitment[commitment_id] = assoc

    def get(self, commitment_id: int) -> Association | None:
        """The request's association if it is still established, else None."""
        with self._lock:
            assoc = self._by_commitment.get(commitment_id)
            if assoc is not None and not assoc.is_established:
                del self._by_commitment[commitment_id]
                return None
            return assoc

    def forget(self, commitment_id: int) -> None:
        with self._lock:
            self._by_commitment.pop(commitment_id, None)


class StorageCommitmentService:
    """The N-ACTION handler, bound on the receiver's AE (``ExtraServices``)."""

    #: offered with SCP/SCU role selection: a requester proposing to be SCU (and SCP) is
    #: accepted as proposed; stowaway is the SCP on the association either way
    contexts: Final = (StorageCommitmentPushModel,)

    def __init__(
        self,
        commitments: Commitments,
        *,
        process_id: str,
        is_known: Callable[[str], bool],
        associations: OpenAssociations,
        max_items: int = DEFAULT_MAX_ITEMS,
        on_request: Callable[[Recorded], None] = lambda _r: None,
    ) -> None:
        self.commitments = commitments
        self.process_id = process_id
        self.is_known = is_known
        self.associations = associations
        self.max_items = max_items
        self.on_request = on_request

    def handlers(self) -> Iterator[tuple[Any, Callable[..., Any]]]:
        yield evt.EVT_N_ACTION, self._on_n_action

    def _on_n_action(self, event: Event) -> tuple[Dataset | int, Dataset | None]:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        fields: dict[str, Any] = {"calling_aet": calling, "peer": peer}
        try:
            request = self._request(event, calling, peer)
        except _Refused as refused:
            log.warning(
                "commitment_refused",
                extra={**fields, "status": f"0x{refused.status:04X}", "reason": refused.comment},
            )
            return _status(refused.status, refused.comment), None
        fields["transaction_uid"] = request.transaction_uid
        fields["items"] = len(request.items)
        try:
            recorded = self.commitments.record(request)
        except SQLAlchemyError as exc:
            reason = f"queue database unavailable: {first_line(exc, 200)}"
            log.error("commitment_not_recorded", extra={**fields, "reason": reason})
            return _status(PROCESSING_FAILURE, "Queue database unavailable; try again"), None
        if recorded.outcome == Recorded.CONFLICT:
            comment = "Transaction UID already used for a different request"
            log.warning(
                "commitment_refused", extra={**fields, "status": "0x0115", "reason": comment}
            )
            return _status(INVALID_ARGUMENT_VALUE, comment), None
        self.associations.add(recorded.id, assoc)
        log.info(
            "commitment_requested",
            extra={**fields, "commitment": recorded.id, "recorded": recorded.outcome.value},
        )
        self.on_request(recorded.outcome)
        return _status(SUCCESS, None), None

    def _request(self, event: Event, calling: str, peer: str) -> CommitmentRequest:
        request = event.request
        if getattr(request, "ActionTypeID", None) != REQUEST_STORAGE_COMMITMENT:
            raise _Refused(NO_SUCH_ACTION, "Only Action Type 1 (request storage commitment)")
        requested = str(getattr(request, "RequestedSOPInstanceUID", "") or "")
        if requested != PUSH_MODEL_INSTANCE:
            raise _Refused(
                INVALID_OBJECT_INSTANCE, f"Requested SOP Instance must be {PUSH_MODEL_INSTANCE}"
            )
        if not self.is_known(calling):
            # Google's adapter answers the same.
            raise _Refused(PROCESSING_FAILURE, "Unknown AET")
        try:
            info = event.action_information
            transaction = str(info.get("TransactionUID", "") or "").strip()
            sequence = info.get("ReferencedSOPSequence")
        except Exception as exc:  # pydicom raises many kinds on malformed data
            raise _Refused(
                INVALID_ARGUMENT_VALUE, f"Action Information unreadable: {first_line(exc, 80)}"
            ) from None
        if not transaction or len(transaction) > 64:
            raise _Refused(INVALID_ARGUMENT_VALUE, "Transaction UID (0008,1195) missing")
        if not sequence:
            raise _Refused(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1150) empty")
        if len(sequence) > self.max_items:
            raise _Refused(RESOURCE_LIMITATION, f"At most {self.max_items} instances per request")
        items: list[RequestedItem] = []
        for index, item in enumerate(sequence, 1):
            sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not sop_class or not sop_instance or max(len(sop_class), len(sop_instance)) > 64:
                raise _Refused(
                    INVALID_ARGUMENT_VALUE,
                    f"Referenced SOP Sequence item {index}: SOP Class or Instance UID missing",
                )
            items.append(RequestedItem(sop_class, sop_instance))
        called = str(getattr(event.assoc.acceptor, "ae_title", "") or "").strip()
        return CommitmentRequest(
            transaction_uid=transaction,
            calling_aet=calling,
            called_aet=called[:16],
            peer_address=peer[:64],
            received_by=self.process_id,
            items=tuple(items),
        )


class _Refused(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _status(code: int, comment: str | None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status
