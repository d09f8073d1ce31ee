"""A storage commitment SCU in pynetdicom: it asks with N-ACTION and takes the
N-EVENT-REPORT on the same association (:func:`request_on_one_association`) or on an
association stowaway opens to it (:class:`ReportListener`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from tests.support.dicom_files import read_uids
from tests.support.processes import free_port

PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT as received."""

    event_type: int
    transaction_uid: str
    #: SOP Instance UIDs of the Referenced SOP Sequence
    committed: tuple[str, ...]
    #: SOP Instance UID -> Failure Reason
    failed: dict[str, int]
    #: the SOP Class UIDs the report named, by SOP Instance UID
    classes: dict[str, str] = field(default_factory=dict)


def report_of(event: Event) -> Report:
    info = event.event_information
    committed = tuple(
        str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
    )
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
        for i in info.get("FailedSOPSequence", [])
    }
    classes = {
        str(i.ReferencedSOPInstanceUID): str(i.ReferencedSOPClassUID)
        for seq in ("ReferencedSOPSequence", "FailedSOPSequence")
        for i in info.get(seq, [])
    }
    return Report(int(event.event_type), str(info.TransactionUID), committed, failed, classes)


def references(files: Sequence[Path]) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each file."""
    import pydicom

    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), read_uids(path).sop_uid))
    return out


def action_information(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def send_n_action(
    port: int,
    refs: Sequence[tuple[str, str]],
    *,
    aet: str = "MODALITY",
    transaction_uid: str | None = None,
    information: Dataset | None = None,
) -> tuple[int, str]:
    """N-ACTION on an association released at once; returns (status, transaction UID).

    ``information``: Action Information to send instead of the one ``refs`` make."""
    transaction_uid = transaction_uid or generate_uid()
    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMPORTADAPTER")
    assert assoc.is_established, "association to stowaway not established"
    try:
        status, _reply = assoc.send_n_action(
            information or action_information(transaction_uid, refs),
            1,
            StorageCommitmentPushModel,
            PUSH_MODEL_INSTANCE,
        )
        return int(status.Status), transaction_uid
    finally:
        assoc.release()


def request_on_one_association(
    port: int,
    refs: Sequence[tuple[str, str]],
    *,
    aet: str = "MODALITY",
    wait: float = 30.0,
) -> tuple[int, Report | None]:
    """N-ACTION, then keep the association open until the report arrives on it (or
    ``wait`` passes); returns the N-ACTION status and the report."""
    reports: list[Report] = []

    def on_report(event: Event) -> tuple[int, None]:
        reports.append(report_of(event))
        return 0x0000, None

    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.network_timeout = ae.dimse_timeout = wait + 5
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="IMPORTADAPTER",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established, "association to stowaway not established"
    try:
        status, _ = assoc.send_n_action(
            action_information(generate_uid(), refs),
            1,
            StorageCommitmentPushModel,
            PUSH_MODEL_INSTANCE,
        )
        deadline = time.monotonic() + wait
        while not reports and time.monotonic() < deadline and assoc.is_established:
            time.sleep(0.05)
        # The handler's answer is sent after it returns: give it time to leave.
        time.sleep(0.5)
        return int(status.Status), (reports[0] if reports else None)
    finally:
        if assoc.is_established:
            assoc.release()


class ReportListener:
    """A storage commitment SCU's listener: accepts the associations stowaway opens
    (stowaway proposing the SCP role) and keeps each N-EVENT-REPORT."""

    def __init__(self, aet: str = "MODALITY", port: int | None = None) -> None:
        self.aet = aet
        self.port = port or free_port()
        self.reports: list[Report] = []
        self.roles: list[tuple[bool, bool]] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def entry(self) -> dict[str, Any]:
        """Its AE dictionary entry."""
        return {"name": self.aet, "host": "127.0.0.1", "port": self.port}

    def start(self) -> ReportListener:
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_report(self, event: Event) -> tuple[int, None]:
        context = next(
            c for c in event.assoc.accepted_contexts if c.context_id == event.context.context_id
        )
        with self._lock:
            self.reports.append(report_of(event))
            # its own roles on the association: (True, False) when stowaway is the SCP
            self.roles.append((bool(context.as_scu), bool(context.as_scp)))
        return 0x0000, None

    def by_transaction(self, transaction_uid: str) -> list[Report]:
        with self._lock:
            return [r for r in self.reports if r.transaction_uid == transaction_uid]

    def __enter__(self) -> ReportListener:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
