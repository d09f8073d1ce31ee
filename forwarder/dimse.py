"""Delivery to a DICOM node with C-STORE (pynetdicom SCU).

A :class:`DimseSender` sends a batch of spool files over one association (and opens the
next when ``instances_per_association`` is reached or the peer went away). Presentation
contexts come from the stored files: each file's SOP class with its own transfer syntax,
and, when that syntax is uncompressed, the other uncompressed ones as a fallback (the
instance is then re-encoded by pynetdicom, which only changes its encoding, not a value).

The DIMSE status table (``DIMSE_STATUS_TABLE``; first matching row wins), in the same
outcome kinds as the STOW-RS table in :mod:`stowaway.forwarder.outcome`:

=======================  ============  ================================================
C-STORE status           Kind          Why
=======================  ============  ================================================
0x0000                   SUCCESS
0xB000, 0xB006, 0xB007   SUCCESS       Warnings: coercion, elements discarded, data set
                                       does not match SOP class; the node keeps it.
0xA700-0xA7FF            TRANSIENT     Out of resources: try again later.
0xA900-0xA9FF            CONFLICT      Data set does not match SOP class.
0xC000-0xCFFF            CONFLICT      Cannot understand.
0x0122                   CONFLICT      SOP class not supported.
0x0124                   BLOCKED       Not authorized: the node refuses us, not it.
anything else            CONFLICT      Failed as sent; re-sending the same bytes won't help.
=======================  ============  ================================================

Around the statuses: an association rejected by the node makes the destination BLOCKED
(with the reject's result, source and reason); refused or timed-out connections, an
aborted association or one that dropped mid-transfer are TRANSIENT; a context the node
did not accept for an instance's SOP class and transfer syntax is CONFLICT (it will not
accept it next time either); an unreadable spool file is PERMANENT.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from stowaway.forwarder.destinations import DimseDestination
from stowaway.forwarder.outcome import InstanceOutcome, OutcomeKind
from stowaway.forwarder.stow import UploadItem
from stowaway.text import describe_error, first_line

log = logging.getLogger("stowaway.forwarder")

UNCOMPRESSED: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


@dataclass(frozen=True)
class StatusRule:
    """Statuses ``low..high`` map to ``kind``."""

    low: int
    high: int
    kind: OutcomeKind
    meaning: str


DIMSE_STATUS_TABLE: Final = (
    StatusRule(0x0000, 0x0000, OutcomeKind.SUCCESS, "success"),
    StatusRule(0xB000, 0xB000, OutcomeKind.SUCCESS, "warning: coercion of data elements"),
    StatusRule(0xB006, 0xB006, OutcomeKind.SUCCESS, "warning: elements discarded"),
    StatusRule(0xB007, 0xB007, OutcomeKind.SUCCESS, "warning: data set does not match SOP class"),
    StatusRule(0xA700, 0xA7FF, OutcomeKind.TRANSIENT, "refused: out of resources"),
    StatusRule(0xA900, 0xA9FF, OutcomeKind.CONFLICT, "error: data set does not match SOP class"),
    StatusRule(0xC000, 0xCFFF, OutcomeKind.CONFLICT, "error: cannot understand"),
    StatusRule(0x0122, 0x0122, OutcomeKind.CONFLICT, "refused: SOP class not supported"),
    StatusRule(0x0124, 0x0124, OutcomeKind.BLOCKED, "refused: not authorized"),
)


def classify_status(status: int, error_comment: str | None = None) -> InstanceOutcome:
    """One C-STORE response status as an outcome (see the module docstring)."""
    rule = next((r for r in DIMSE_STATUS_TABLE if r.low <= status <= r.high), None)
    kind = rule.kind if rule else OutcomeKind.CONFLICT
    meaning = rule.meaning if rule else "failed"
    detail = f"C-STORE status 0x{status:04X} ({meaning})"
    if error_comment:
        detail += f": {first_line(error_comment)}"
    return InstanceOutcome(kind, detail)


@dataclass(frozen=True)
class OutgoingFile:
    """One spool file to send, with what its queue row says about it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def proposed_syntaxes(transfer_syntax_uid: str) -> tuple[str, ...]:
    """The stored syntax first; for an uncompressed one, the other uncompressed ones too."""
    if transfer_syntax_uid in UNCOMPRESSED:
        return (transfer_syntax_uid, *(ts for ts in UNCOMPRESSED if ts != transfer_syntax_uid))
    return (transfer_syntax_uid,)


def presentation_contexts(files: Sequence[OutgoingFile]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax) of the batch; at most 128, the
    standard's limit, so a batch with more pairs is sent in several associations."""
    pairs = dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in files)
    return [build_context(sop_class, list(proposed_syntaxes(ts))) for sop_class, ts in pairs]


MAX_CONTEXTS: Final = 128


def _transient(detail: str) -> InstanceOutcome:
    return InstanceOutcome(OutcomeKind.TRANSIENT, detail)


class DimseSender:
    """Sends spool files to one DICOM node; not shared between threads (each forwarder
    worker of the destination has its own, one association at a time)."""

    def __init__(self, destination: DimseDestination, acse_timeout: float = 30.0) -> None:
        self.destination = destination
        self._acse_timeout = acse_timeout
        self._tls = self._ssl_context() if destination.tls else None

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.destination.tls
        assert tls is not None
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if tls.cert is not None and tls.key is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    def _ae(self, contexts: list[PresentationContext]) -> AE:
        ae = AE(ae_title=self.destination.calling_aet)
        ae.requested_contexts = contexts
        ae.acse_timeout = self._acse_timeout
        ae.dimse_timeout = max(self.destination.delivery.connect_timeout, 30.0)
        ae.network_timeout = max(self.destination.delivery.connect_timeout, 30.0)
        ae.connection_timeout = self.destination.delivery.connect_timeout
        return ae

    def _associate(self, contexts: list[PresentationContext]) -> Association | InstanceOutcome:
        d = self.destination
        tls_args = (self._tls, d.host) if self._tls is not None else None
        answers: list[object] = []  # the A-ASSOCIATE-RJ, which pynetdicom does not keep
        handlers: list[Any] = [(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
        try:
            assoc = self._ae(contexts).associate(
                d.host, d.port, ae_title=d.called_aet, tls_args=tls_args, evt_handlers=handlers
            )
        except (OSError, ssl.SSLError) as exc:
            return _transient(f"cannot connect to {d.host}:{d.port}: {describe_error(exc)}")
        if assoc.is_established:
            return assoc
        where = f"{d.called_aet}@{d.host}:{d.port}"
        if assoc.is_rejected:
            reject = next((a for a in answers if isinstance(a, A_ASSOCIATE)), None)
            why = (
                f"result {reject.result_str}, source {reject.source_str}, "
                f"reason {reject.reason_str}"
                if reject is not None
                else "no reason given"
            )
            return InstanceOutcome(OutcomeKind.BLOCKED, f"association rejected by {where} ({why})")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            offered = ", ".join(sorted({str(cx.abstract_syntax) for cx in contexts}))
            return InstanceOutcome(
                OutcomeKind.CONFLICT, f"{where} accepts none of the SOP classes {offered}"
            )
        if assoc.is_aborted:
            return _transient(f"association aborted by {where} while negotiating")
        return _transient(f"no association with {where} (connection failed or timed out)")

    def send(self, files: Sequence[OutgoingFile]) -> list[InstanceOutcome]:
        """Send every file; one outcome per file, in order. Never raises for what the node
        or the network does."""
        outcomes: list[InstanceOutcome | None] = [None] * len(files)
        per_association = self.destination.instances_per_association
        start = 0
        while start < len(files):
            chunk = self._next_chunk(files, start, per_association)
            self._send_chunk(files, chunk, outcomes)
            start = chunk[-1] + 1
        return [o if o is not None else _transient("not sent") for o in outcomes]

    @staticmethod
    def _next_chunk(files: Sequence[OutgoingFile], start: int, limit: int) -> list[int]:
        """Indexes from ``start``: at most ``limit`` files and 128 contexts."""
        pairs: set[tuple[str, str]] = set()
        chunk: list[int] = []
        for index in range(start, len(files)):
            pair = (files[index].sop_class_uid, files[index].transfer_syntax_uid)
            if len(chunk) >= limit or (pair not in pairs and len(pairs) >= MAX_CONTEXTS):
                break
            pairs.add(pair)
            chunk.append(index)
        return chunk

    def _send_chunk(
        self,
        files: Sequence[OutgoingFile],
        chunk: list[int],
        outcomes: list[InstanceOutcome | None],
    ) -> None:
        assoc = self._associate(presentation_contexts([files[i] for i in chunk]))
        if isinstance(assoc, InstanceOutcome):
            for index in chunk:
                outcomes[index] = assoc
            return
        try:
            for index in chunk:
                if not assoc.is_established:
                    outcomes[index] = _transient("association ended before this instance")
                    continue
                outcomes[index] = self._store(assoc, files[index])
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Association, file: OutgoingFile) -> InstanceOutcome:
        accepted = {
            cx.transfer_syntax[0]
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == file.sop_class_uid and cx.transfer_syntax
        }
        if not accepted:
            return InstanceOutcome(
                OutcomeKind.CONFLICT,
                f"{self.destination.called_aet} accepts SOP class {file.sop_class_uid} in none "
                f"of {', '.join(proposed_syntaxes(file.transfer_syntax_uid))}",
            )
        try:
            if not file.path.is_file():
                raise FileNotFoundError(f"spool file missing: {file.path.name}")
            payload: Path | Dataset = file.path  # sent as stored, byte for byte
            if file.transfer_syntax_uid not in accepted:
                # The node took another uncompressed syntax: pynetdicom re-encodes.
                target = UID(sorted(accepted)[0])
                payload = dcmread(file.path)
                payload.file_meta.TransferSyntaxUID = target
                payload.set_original_encoding(target.is_implicit_VR, target.is_little_endian)
        except (OSError, ValueError) as exc:
            return InstanceOutcome(
                OutcomeKind.PERMANENT, f"unreadable spool file: {first_line(exc)}"
            )
        try:
            status = assoc.send_c_store(payload)
        except (OSError, RuntimeError, ValueError) as exc:
            return _transient(f"C-STORE failed: {describe_error(exc)}")
        if status is None or "Status" not in status:
            # No response: the association was aborted or timed out mid-transfer.
            return _transient("no C-STORE response (association aborted or timed out)")
        comment = status.get("ErrorComment")
        return classify_status(int(status.Status), str(comment) if comment else None)

    def echo(self) -> InstanceOutcome:
        """C-ECHO: is the node there and will it talk to us (``stowaway check``, probes)."""
        assoc = self._associate([build_context("1.2.840.10008.1.1")])
        if isinstance(assoc, InstanceOutcome):
            return assoc
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if status is None or "Status" not in status:
            return _transient("no C-ECHO response")
        code = int(status.Status)
        kind = OutcomeKind.SUCCESS if code == 0 else OutcomeKind.TRANSIENT
        return InstanceOutcome(kind, f"C-ECHO status 0x{code:04X}")


class DimseClient:
    """A :class:`DimseSender` as the forwarder's workers use a delivery client."""

    def __init__(self, destination: DimseDestination) -> None:
        self.sender = DimseSender(destination)

    def store(self, items: Sequence[UploadItem]) -> dict[str, InstanceOutcome]:
        files = [
            OutgoingFile(i.path, i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax_uid)
            for i in items
        ]
        outcomes = self.sender.send(files)
        return {f.sop_instance_uid: o for f, o in zip(files, outcomes, strict=True)}

    def probe(self) -> InstanceOutcome:
        return self.sender.echo()

    def delete_instance(self, study: str, series: str, sop: str) -> InstanceOutcome:
        # DIMSE has no delete: on_conflict overwrite is refused for these destinations.
        return InstanceOutcome(OutcomeKind.PERMANENT, "a DICOM node cannot delete instances")

    def close(self) -> None:
        """Associations are released after each batch: nothing stays open."""
