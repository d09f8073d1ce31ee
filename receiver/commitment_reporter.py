"""Storage Commitment Push Model SCP (PS3.4 Annex J): the N-EVENT-REPORT side.

A small worker loop. Each pass claims open requests that are due, with a lease
(:meth:`db.commitments.Commitments.claim_due`: on a shared Postgres queue one process
at a time holds each; a request is left to the process that took its N-ACTION for two
polls, so that with several receiver processes the report goes on the requester's
association when it is still open), and for each:

1. while it is not settled, applies the settlement rule
   (:func:`db.commitments.settle_item`) to every item, optionally verifying each
   committed item at its DICOMweb destinations (``--commitment-verify``); when every
   item is settled (or ``--commitment-timeout`` has passed) it writes the result,
   otherwise it gives the request back to be looked at again after ``poll_interval``;
2. sends the report (J.3.3.1.2): Event Type 1 when every item is committed, 2 otherwise,
   with the Referenced SOP Sequence (the committed items) and the Failed SOP Sequence
   (the others, each with its Failure Reason). It goes on the association the request
   came on when this process holds it and it is still open; otherwise on a new
   association to the requester's address in the AE dictionary, proposing the SCP role
   (SCP/SCU role selection, J.3.3.1.3 note). A report the requester did not take is
   tried again with the uploads' backoff, durably (the next attempt time is the
   request's row), for ``report_for``; then the request is ``abandoned``.

Delivery of a report is at least once: a process killed after the requester answered
and before its commit sends it again after the lease expires, with the same Transaction
UID and content.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError

from stowaway.backoff import RetryPolicy
from stowaway.db.commitments import (
    FAILURES_EXIST,
    CommitmentRecord,
    Commitments,
    ItemRecord,
    LeaseLost,
    Settlement,
    settle_item,
)
from stowaway.db.models import ItemResult, utcnow
from stowaway.receiver.aet_dictionary import MoveDestination
from stowaway.receiver.storage_commitment import PUSH_MODEL_INSTANCE, OpenAssociations
from stowaway.text import first_line

log = logging.getLogger("stowaway.commitment")

#: Whether a destination holds an instance: ``verify(destination, sop_instance_uid)``
#: is True when it was found (or the destination cannot be asked: a DICOM node), False
#: when it was not found or the question failed.
Verify = Callable[[str, str], bool]

SUCCESS: Final = 0x0000
#: Polls a due request waits for the process that took it (see ``handover``).
HANDOVER_POLLS: Final = 2


@dataclass(frozen=True)
class ReporterConfig:
    """How the reporter works; see the module docstring."""

    #: calling AE title of a report's new association
    aet: str
    #: an item not settled this long after the request fails with 0x0110
    timeout: timedelta = timedelta(hours=1)
    #: how long an undelivered report is retried before the request is abandoned
    report_for: timedelta = timedelta(days=1)
    #: how often an open request is looked at again
    poll_interval: float = 1.0
    #: the backoff of a report the requester did not take
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: how long a claim holds a request (longer than a settlement and a report take)
    lease: timedelta = timedelta(minutes=2)
    #: requests per claim
    batch: int = 20
    #: connect, association and answer timeout of a report (seconds)
    network_timeout: float = 30.0

    @property
    def handover(self) -> timedelta:
        """How long a due request is left to the process that took its N-ACTION (the
        one that may hold the requester's association) before another takes it."""
        return timedelta(seconds=HANDOVER_POLLS * self.poll_interval)


@dataclass(frozen=True)
class ReportOutcome:
    """One report sent (or not), for metrics."""

    delivered: bool
    event_type: int
    #: Failure Reasons of its failed items (one entry per item)
    failure_reasons: tuple[int, ...] = ()
    abandoned: bool = False


class Reporter:
    """The worker loop (one thread); ``stop()`` lets the request in hand finish."""

    def __init__(
        self,
        config: ReporterConfig,
        commitments: Commitments,
        *,
        owner: str,
        requesters: Mapping[str, MoveDestination],
        associations: OpenAssociations,
        verify: Verify | None = None,
        on_report: Callable[[ReportOutcome], None] = lambda _o: None,
        is_dead: Callable[[str], bool] = lambda _owner: False,
    ) -> None:
        self.config = config
        self.commitments = commitments
        self.owner = owner
        self.requesters = requesters
        self.associations = associations
        self.verify = verify
        self.on_report = on_report
        #: whether a lease owner is a process known to be dead (this host's previous run)
        self.is_dead = is_dead
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commitment-reporter", daemon=True)
        self._thread.start()
        log.info(
            "commitment_reporter_started",
            extra={
                "timeout_s": self.config.timeout.total_seconds(),
                "verify": self.verify is not None,
                "requesters": len(self.requesters),
            },
        )

    def stop(self, grace: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(grace)

    def _run(self) -> None:
        try:
            self.release_dead_leases()
        except SQLAlchemyError as exc:
            log.warning("commitment_reporter_db_error", extra={"error": first_line(exc, 200)})
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except SQLAlchemyError as exc:
                log.warning("commitment_reporter_db_error", extra={"error": first_line(exc, 200)})
                worked = 0
            if not worked:
                self._stop.wait(self.config.poll_interval)

    def release_dead_leases(self) -> None:
        """Requests a killed run of this process held need not wait for its leases."""
        for owner in self.commitments.lease_owners():
            if owner != self.owner and self.is_dead(owner):
                released = self.commitments.release_owner(owner)
                log.info("commitment_leases_released", extra={"owner": owner, "requests": released})

    def run_once(self) -> int:
        """One claim and the work on what it took; returns how many requests it took."""
        claimed = self.commitments.claim_due(
            self.owner, self.config.lease, self.config.batch, handover=self.config.handover
        )
        # Reports to unreachable requesters take up to a timeout each: what is left once
        # half the lease is used goes back, before another process may take it over.
        give_back_at = time.monotonic() + self.config.lease.total_seconds() / 2
        for index, commitment in enumerate(claimed):
            if self._stop.is_set() or time.monotonic() > give_back_at:
                for rest in claimed[index:]:
                    self.commitments.release(rest.id, self.owner)
                break
            try:
                self._work_on(commitment)
            except LeaseLost as exc:
                log.warning("commitment_lease_lost", extra={"reason": str(exc)})
        return len(claimed)

    # -- settling ----------------------------------------------------------------------

    def _work_on(self, commitment: CommitmentRecord) -> None:
        items = self.commitments.items(commitment.id)
        if commitment.settled_at is None:
            settlements = self._settlements(commitment, items)
            if any(s.result is None for s in settlements):
                later = utcnow() + timedelta(seconds=self.config.poll_interval)
                self.commitments.wait(commitment.id, self.owner, later)
                return
            kind: int = self.commitments.settle(commitment.id, self.owner, settlements)
            log.info(
                "commitment_settled",
                extra={
                    "commitment": commitment.id,
                    "transaction_uid": commitment.transaction_uid,
                    "event_type": kind,
                    "committed": sum(s.result == ItemResult.COMMITTED for s in settlements),
                    "failed": sum(s.result == ItemResult.FAILED for s in settlements),
                },
            )
            items = self.commitments.items(commitment.id)
        else:
            kind = commitment.event_type or FAILURES_EXIST
        self._report(commitment, items, kind)

    def _settlements(
        self, commitment: CommitmentRecord, items: Sequence[ItemRecord]
    ) -> list[Settlement]:
        deliveries = self.commitments.deliveries([i.sop_instance_uid for i in items])
        expired = utcnow() - commitment.requested_at >= self.config.timeout
        out: list[Settlement] = []
        for item in items:
            found = deliveries.get(item.sop_instance_uid, [])
            settlement = settle_item(item.sop_class_uid, found, expired=expired)
            if self.verify is not None and settlement.result == ItemResult.COMMITTED:
                missing = [
                    d for d in settlement.delivered_to if not self.verify(d, item.sop_instance_uid)
                ]
                if missing:
                    settlement = settle_item(
                        item.sop_class_uid, found, expired=expired, not_found_at=missing
                    )
            out.append(settlement)
        return out

    # -- reporting ---------------------------------------------------------------------

    def _report(self, commitment: CommitmentRecord, items: Sequence[ItemRecord], kind: int) -> None:
        dataset = report_dataset(commitment.transaction_uid, items)
        reasons = tuple(i.failure_reason or 0 for i in items if i.result == ItemResult.FAILED)
        fields: dict[str, Any] = {
            "commitment": commitment.id,
            "transaction_uid": commitment.transaction_uid,
            "calling_aet": commitment.calling_aet,
            "event_type": kind,
        }
        error, how = self._send(commitment, dataset, kind)
        if error is None:
            self.commitments.reported(commitment.id, self.owner)
            self.associations.forget(commitment.id)
            log.info("commitment_reported", extra={**fields, "association": how})
            self.on_report(ReportOutcome(True, kind, reasons))
            return
        attempts = commitment.report_attempts + 1
        settled_at = commitment.settled_at or utcnow()
        next_at: datetime | None = utcnow() + timedelta(seconds=self.config.retry.delay(attempts))
        if next_at is not None and next_at - settled_at > self.config.report_for:
            next_at = None
        self.commitments.report_failed(commitment.id, self.owner, error, next_at)
        log.warning(
            "commitment_report_failed" if next_at else "commitment_abandoned",
            extra={
                **fields,
                "error": error,
                "attempts": attempts,
                "next_attempt_at": next_at.isoformat() if next_at else None,
            },
        )
        self.on_report(ReportOutcome(False, kind, reasons, abandoned=next_at is None))

    def _send(
        self, commitment: CommitmentRecord, dataset: Dataset, kind: int
    ) -> tuple[str | None, str]:
        """Send the report; returns (None, how) when the requester answered Success, else
        (what went wrong, how)."""
        same = self.associations.get(commitment.id)
        if same is not None:
            try:
                error = _answer(_send_report(same, dataset, kind))
            except Exception as exc:  # the association went away under us
                error = f"on the request's association: {first_line(exc, 200)}"
            if error is None:
                return None, "same"
            log.info(
                "commitment_same_association_failed",
                extra={"commitment": commitment.id, "error": error},
            )
        where = self.requesters.get(commitment.calling_aet)
        if where is None:
            return f"{commitment.calling_aet} is not in the AE dictionary", "new"
        return self._send_new(where, dataset, kind), "new"

    def _send_new(self, where: MoveDestination, dataset: Dataset, kind: int) -> str | None:
        ae = AE(ae_title=self.config.aet)
        ae.add_requested_context(
            StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        timeout = self.config.network_timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        try:
            assoc = ae.associate(
                where.host,
                where.port,
                ae_title=where.name,
                ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
            )
        except Exception as exc:
            return f"association to {where.name}@{where.host}:{where.port}: {first_line(exc)}"
        if not assoc.is_established:
            state = "rejected" if assoc.is_rejected else "not established"
            return f"association to {where.name}@{where.host}:{where.port} {state}"
        try:
            return _answer(_send_report(assoc, dataset, kind))
        except Exception as exc:
            return f"N-EVENT-REPORT to {where.name}: {first_line(exc, 200)}"
        finally:
            if assoc.is_established:
                assoc.release()


def _send_report(assoc: Association, dataset: Dataset, kind: int) -> Dataset:
    status, _reply = assoc.send_n_event_report(
        dataset, kind, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE
    )
    return status


def _answer(status: Dataset) -> str | None:
    code = getattr(status, "Status", None)
    if code is None:
        return "no N-EVENT-REPORT response (timeout or association aborted)"
    if int(code) != SUCCESS:
        return f"the requester answered 0x{int(code):04X}"
    return None


def report_dataset(transaction_uid: str, items: Sequence[ItemRecord]) -> Dataset:
    """Event Information of the report (PS3.4 Table J.3-2): the Transaction UID, the
    Referenced SOP Sequence (committed items; absent when none) and, for Event Type 2,
    the Failed SOP Sequence with each item's Failure Reason."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    committed = [i for i in items if i.result == ItemResult.COMMITTED]
    failed = [i for i in items if i.result != ItemResult.COMMITTED]
    if committed:
        ds.ReferencedSOPSequence = [_reference(i) for i in committed]
    if failed:
        sequence = []
        for item in failed:
            ref = _reference(item)
            ref.FailureReason = item.failure_reason or 0x0110
            sequence.append(ref)
        ds.FailedSOPSequence = sequence
    return ds


def _reference(item: ItemRecord) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = item.sop_class_uid
    ref.ReferencedSOPInstanceUID = item.sop_instance_uid
    return ref
