"""Delivery over DIMSE to real DICOM nodes: DCMTK's storescp, Orthanc's DICOM port, and a
pynetdicom SCP that answers the statuses a node may answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import MRImageStorage, Verification

from stowaway.forwarder.destinations import Delivery, DimseDestination
from stowaway.forwarder.dimse import DimseSender, OutgoingFile, classify_status
from stowaway.forwarder.outcome import OutcomeKind
from tests.support.dicom_files import dataset_bytes, make_study, read_uids
from tests.support.orthanc import OrthancServer
from tests.support.processes import free_port
from tests.support.processes import storescp as running_storescp

pytestmark = pytest.mark.timeout(120)


def destination(
    port: int, called_aet: str = "NODE", per_association: int = 100
) -> DimseDestination:
    return DimseDestination(
        name="node",
        host="127.0.0.1",
        port=port,
        called_aet=called_aet,
        calling_aet="STOWAWAY",
        delivery=Delivery(workers=1, connect_timeout=5),
        instances_per_association=per_association,
    )


def outgoing(paths: list[Path]) -> list[OutgoingFile]:
    files = []
    for path in paths:
        uids = read_uids(path)
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        files.append(OutgoingFile(path, uids.sop_class_uid, uids.sop_uid, syntax))
    return files


class StatusNode:
    """A pynetdicom Storage SCP on loopback that answers each C-STORE with ``status``."""

    def __init__(self, status: int = 0x0000, comment: str | None = None, **ae_options: Any):
        self.status, self.comment = status, comment
        self.received: list[Dataset] = []
        self.associations = 0
        self.ae = AE(ae_title="NODE")
        syntaxes = ae_options.pop("syntaxes", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for sop_class in ae_options.pop("sop_classes", [CTImageStorage]):
            self.ae.add_supported_context(sop_class, syntaxes)
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = ae_options.pop("require_called_aet", False)
        self.port = free_port()
        self.lock = threading.Lock()

    def _store(self, event: evt.Event) -> Any:
        with self.lock:
            self.received.append(event.dataset)
        if self.comment is None:
            return self.status
        answer = Dataset()
        answer.Status = self.status
        answer.ErrorComment = self.comment
        return answer

    def _established(self, event: evt.Event) -> None:
        with self.lock:
            self.associations += 1

    def __enter__(self) -> StatusNode:
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)]
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "study", 5, rows=16, cols=16)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with running_storescp(tmp_path / "storescp", "STORESCP") as port:
        yield port, tmp_path / "storescp"


def test_every_instance_reaches_storescp_unchanged(
    storescp: tuple[int, Path], study: list[Path]
) -> None:
    port, out = storescp
    outcomes = DimseSender(destination(port, "STORESCP")).send(outgoing(study))
    assert [o.kind for o in outcomes] == [OutcomeKind.SUCCESS] * len(study)
    received = {read_uids(p).sop_uid: p for p in out.iterdir()}
    for path in study:
        stored = received[read_uids(path).sop_uid]
        assert dataset_bytes(stored.read_bytes()) == dataset_bytes(path.read_bytes())


def test_every_instance_reaches_orthancs_dicom_port(
    orthanc: OrthancServer, study: list[Path]
) -> None:
    outcomes = DimseSender(destination(orthanc.dicom_port, orthanc.aet)).send(outgoing(study))
    assert all(o.kind is OutcomeKind.SUCCESS for o in outcomes), outcomes
    assert orthanc.instance_uids() == {read_uids(p).sop_uid for p in study}


def test_many_instances_per_association_up_to_the_limit(study: list[Path]) -> None:
    with StatusNode() as node:
        outcomes = DimseSender(destination(node.port, per_association=2)).send(outgoing(study))
    assert all(o.kind is OutcomeKind.SUCCESS for o in outcomes)
    assert len(node.received) == 5 and node.associations == 3


@pytest.mark.parametrize(
    ("status", "comment", "kind"),
    [
        (0xB007, None, OutcomeKind.SUCCESS),
        (0xA700, "disk full", OutcomeKind.TRANSIENT),
        (0xA900, "not a CT", OutcomeKind.CONFLICT),
        (0xC000, "cannot parse", OutcomeKind.CONFLICT),
        (0x0124, None, OutcomeKind.BLOCKED),
        (0x0110, None, OutcomeKind.CONFLICT),
    ],
)
def test_the_nodes_status_decides_the_outcome(
    study: list[Path], status: int, comment: str | None, kind: OutcomeKind
) -> None:
    with StatusNode(status, comment) as node:
        (outcome,) = DimseSender(destination(node.port)).send(outgoing(study[:1]))
    assert outcome.kind is kind
    assert f"0x{status:04X}" in outcome.detail
    if comment:
        assert comment in outcome.detail


def test_a_rejected_association_blocks_the_destination_with_the_reason(study: list[Path]) -> None:
    with StatusNode(require_called_aet=True) as node:
        (outcome,) = DimseSender(destination(node.port, called_aet="WRONG")).send(
            outgoing(study[:1])
        )
    assert outcome.kind is OutcomeKind.BLOCKED
    assert "rejected" in outcome.detail and "Called AE title not recognised" in outcome.detail


def test_nobody_listening_is_transient(study: list[Path]) -> None:
    outcomes = DimseSender(destination(free_port())).send(outgoing(study[:2]))
    assert [o.kind for o in outcomes] == [OutcomeKind.TRANSIENT] * 2


def test_an_uncompressed_instance_falls_back_to_the_syntax_the_node_takes(
    study: list[Path],
) -> None:
    with StatusNode(syntaxes=[ImplicitVRLittleEndian]) as node:
        (outcome,) = DimseSender(destination(node.port)).send(outgoing(study[:1]))
    assert outcome.kind is OutcomeKind.SUCCESS
    original = dcmread(study[0])
    (received,) = node.received
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PixelData == original.PixelData


def test_a_sop_class_the_node_refuses_fails_that_instance(
    study: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver (imported by other tests in this process) makes pynetdicom accept
    # every storage class; this node must not.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    with StatusNode(sop_classes=[MRImageStorage]) as node:
        (outcome,) = DimseSender(destination(node.port)).send(outgoing(study[:1]))
    assert outcome.kind is OutcomeKind.CONFLICT and CTImageStorage in outcome.detail
    assert node.received == []


def test_a_missing_spool_file_is_permanent_and_the_rest_still_go(study: list[Path]) -> None:
    files = outgoing(study[:3])
    study[1].unlink()
    with StatusNode() as node:
        outcomes = DimseSender(destination(node.port)).send(files)
    assert [o.kind for o in outcomes] == [
        OutcomeKind.SUCCESS,
        OutcomeKind.PERMANENT,
        OutcomeKind.SUCCESS,
    ]


def test_echo_reports_a_live_node() -> None:
    with StatusNode() as node:
        assert DimseSender(destination(node.port)).echo().kind is OutcomeKind.SUCCESS
    assert DimseSender(destination(free_port())).echo().kind is OutcomeKind.TRANSIENT


def test_status_table_unknown_failures_keep_the_code() -> None:
    outcome = classify_status(0xFE00, "cancelled")
    assert outcome.kind is OutcomeKind.CONFLICT and "0xFE00" in outcome.detail
