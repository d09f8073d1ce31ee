"""Query/retrieve through the gateway: C-FIND, C-MOVE and C-GET answered from Orthanc.

stowaway runs as a real ``receive`` process with ``--query-url`` at Orthanc's DICOMweb
root; the SCUs are DCMTK's findscu/movescu/getscu, PixelMed's and pynetdicom's. What they
get is compared with Orthanc's own REST API, and retrieved instances byte for byte with
Orthanc's copies.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from tests.conftest import StowawayFactory
from tests.support.databases import sqlite_url
from tests.support.dicom_files import dataset_bytes, make_ct
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.orthanc import OrthancServer
from tests.support.processes import ECHOSCU, StowawayProcess, free_port

pytestmark = pytest.mark.timeout(120)

FINDSCU = "/usr/bin/findscu"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
PIXELMED = "/usr/share/java/pixelmed.jar"
AET = "IMPORTADAPTER"
#: The study and series PixelMed's FindSOPClassSCU asks for (its main() has them built in).
PIXELMED_STUDY = "1.2.840.113619.2.5.1762386977.1328.985934491.590"
PIXELMED_SERIES = "1.2.840.113619.2.5.1762386977.1328.985934491.643"
PAGE_SIZE = 2
STUDY_FIND = StudyRootQueryRetrieveInformationModelFind


@dataclass(frozen=True)
class Store:
    """The preloaded Orthanc: two patients, three studies, seven instances."""

    orthanc: OrthancServer
    studies: dict[str, list[str]]  # study UID -> SOP instance UIDs


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """The queue plays no part in query/retrieve: SQLite only, to keep these tests short."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


def _instance(
    path: Path,
    *,
    seed: int,
    number: int,
    patient: tuple[str, str],
    date: str,
    modality: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> bytes:
    make_ct(
        path,
        16,
        16,
        seed=seed,
        instance_number=number,
        patient_id=patient[0],
        patient_name=patient[1],
        study_uid=study_uid,
        series_uid=series_uid,
    )
    ds = pydicom.dcmread(path)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


@pytest.fixture
def store(orthanc: OrthancServer, tmp_path: Path) -> Store:
    alpha, beta = ("PAT-A", "Alpha^One"), ("PAT-B", "Beta^Two")
    plan = [
        (1, alpha, "20240102", "CT", 3, None, None),
        (2, alpha, "20230510", "MR", 2, None, None),
        (3, beta, "20220301", "CT", 2, PIXELMED_STUDY, PIXELMED_SERIES),
    ]
    files: list[bytes] = []
    for seed, patient, date, modality, count, study, series in plan:
        for number in range(1, count + 1):
            files.append(
                _instance(
                    tmp_path / "preload" / f"{seed}-{number}.dcm",
                    seed=seed,
                    number=number,
                    patient=patient,
                    date=date,
                    modality=modality,
                    study_uid=study,
                    series_uid=series,
                )
            )
    orthanc.stow(files)
    studies: dict[str, list[str]] = {}
    for data in files:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        studies.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    return Store(orthanc, studies)


def _orthanc_find(orthanc: OrthancServer, level: str, query: dict[str, str], key: str) -> set[str]:
    """What Orthanc's own REST API finds: the ``key`` main DICOM tag of each match."""
    found = orthanc.request(
        "POST", "/tools/find", json={"Level": level, "Query": query, "Expand": True}
    ).json()
    values: set[str] = set()
    for item in found:
        tags = {**item.get("MainDicomTags", {}), **item.get("PatientMainDicomTags", {})}
        values.add(str(tags[key]))
    return values


def _gateway(
    stowaway: StowawayFactory, url: str, *extra: str, destinations: str = "[]"
) -> StowawayProcess:
    return stowaway(
        "receive",
        "--query-url",
        url,
        "--query-page-size",
        str(PAGE_SIZE),
        "--aet-dictionary-inline",
        destinations,
        *extra,
    )


def findscu(port: int, model: str, keys: list[str], out: Path) -> list[Dataset]:
    """findscu's answers (one extracted file per Pending response)."""
    out.mkdir(parents=True, exist_ok=True)
    args = [FINDSCU, "-v", model, "-aec", AET, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    run = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _values(answers: list[Dataset], keyword: str) -> list[str]:
    return [str(a.get(keyword, "")) for a in answers]


# ---------------------------------------------------------------------------- C-FIND


def test_findscu_study_root_each_level_matches_orthanc(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    studies = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate"],
        tmp_path / "study",
    )
    # Three studies over pages of two: the second page was fetched too.
    assert sorted(_values(studies, "StudyInstanceUID")) == sorted(
        _orthanc_find(store.orthanc, "Study", {}, "StudyInstanceUID")
    )
    assert {a.QueryRetrieveLevel for a in studies} == {"STUDY"}
    study = next(iter(store.studies))
    series = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality"],
        tmp_path / "series",
    )
    assert set(_values(series, "SeriesInstanceUID")) == _orthanc_find(
        store.orthanc, "Series", {"StudyInstanceUID": study}, "SeriesInstanceUID"
    )
    images = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID"],
        tmp_path / "image",
    )
    assert sorted(_values(images, "SOPInstanceUID")) == sorted(store.studies[study])
    every = findscu(
        gateway.port, "-S", ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID"], tmp_path / "all"
    )
    # Seven instances, four pages: nothing lost or repeated between pages.
    assert sorted(_values(every, "SOPInstanceUID")) == sorted(store.orthanc.instance_uids())


def test_findscu_wildcard_and_date_range_match_as_orthanc_does(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    wildcard = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "PatientName=Alph*", "StudyInstanceUID"],
        tmp_path / "wildcard",
    )
    expected = _orthanc_find(store.orthanc, "Study", {"PatientName": "Alph*"}, "StudyInstanceUID")
    assert len(expected) == 2
    assert set(_values(wildcard, "StudyInstanceUID")) == expected
    assert set(_values(wildcard, "PatientName")) == {"Alpha^One"}
    ranged = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "StudyDate=20230101-20231231", "StudyInstanceUID"],
        tmp_path / "range",
    )
    expected = _orthanc_find(
        store.orthanc, "Study", {"StudyDate": "20230101-20231231"}, "StudyInstanceUID"
    )
    assert len(expected) == 1
    assert set(_values(ranged, "StudyInstanceUID")) == expected


def test_query_logs_carry_no_patient_names_or_ids(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url, "--log-level", "debug")
    answers = findscu(
        gateway.port,
        "-S",
        ["QueryRetrieveLevel=STUDY", "PatientName=Alph*", "PatientID", "StudyInstanceUID"],
        tmp_path / "found",
    )
    assert set(_values(answers, "PatientID")) == {"PAT-A"}
    log = gateway.log()
    assert "c_find_done" in log
    for secret in ("Alph", "PAT-A"):
        assert secret not in log


def test_findscu_patient_root_patient_and_study_levels(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    patients = findscu(
        gateway.port,
        "-P",
        ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName"],
        tmp_path / "patients",
    )
    # Three studies, two patients: each patient answered once.
    assert sorted(_values(patients, "PatientID")) == sorted(
        _orthanc_find(store.orthanc, "Patient", {}, "PatientID")
    )
    assert {a.QueryRetrieveLevel for a in patients} == {"PATIENT"}
    studies = findscu(
        gateway.port,
        "-P",
        ["QueryRetrieveLevel=STUDY", "PatientID=PAT-A", "StudyInstanceUID"],
        tmp_path / "studies",
    )
    assert set(_values(studies, "StudyInstanceUID")) == _orthanc_find(
        store.orthanc, "Study", {"PatientID": "PAT-A"}, "StudyInstanceUID"
    )


def test_patient_level_in_study_root_is_refused_with_a_reason(
    stowaway: StowawayFactory, store: Store
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = ""
    [(status, _)] = _pynetdicom_find(
        gateway.port, identifier, StudyRootQueryRetrieveInformationModelFind
    )
    assert status.Status == 0xA900
    assert "Patient Root" in status.ErrorComment


def _pynetdicom_find(
    port: int, identifier: Dataset, model: str, cancel_after: int | None = None
) -> list[tuple[Dataset, Dataset | None]]:
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    answers: list[tuple[Dataset, Dataset | None]] = []
    try:
        responses = assoc.send_c_find(identifier, model, msg_id=7)
        for status, found in responses:
            answers.append((status, found))
            if cancel_after is not None and len(answers) == cancel_after:
                context_id = assoc._accepted_cx[next(iter(assoc._accepted_cx))].context_id
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    return answers


class _SlowPages(BaseHTTPRequestHandler):
    """Forwards QIDO-RS to Orthanc, each page ``DELAY`` seconds late."""

    DELAY = 0.4
    target = ""

    def do_GET(self) -> None:
        time.sleep(self.DELAY)
        session = requests.Session()
        session.trust_env = False
        answer = session.get(self.target + self.path, headers={"Accept": self.headers["Accept"]})
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", ""))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def _slow_store(orthanc: OrthancServer) -> Iterator[str]:
    handler = type("Handler", (_SlowPages,), {"target": orthanc.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_find_answers_stream_while_later_pages_are_still_fetched(
    stowaway: StowawayFactory, store: Store
) -> None:
    with _slow_store(store.orthanc) as url:
        gateway = _gateway(stowaway, url)
        ae = AE(ae_title="FINDER")
        ae.add_requested_context(STUDY_FIND)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title=AET)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.SOPInstanceUID = ""
        arrivals: list[tuple[float, int]] = []
        started = time.monotonic()
        try:
            for status, _ in assoc.send_c_find(identifier, STUDY_FIND):
                arrivals.append((time.monotonic() - started, status.Status))
        finally:
            assoc.release()
    pending = [at for at, status in arrivals if status == 0xFF00]
    assert len(pending) == len(store.orthanc.instance_uids())  # seven, in four pages
    # The first match went out while at least two more pages were still to come.
    assert pending[0] < arrivals[-1][0] - 2 * _SlowPages.DELAY, arrivals


def test_c_cancel_stops_a_move_between_sub_operations(
    stowaway: StowawayFactory, store: Store
) -> None:
    study = max(store.studies, key=lambda s: len(store.studies[s]))
    with _slow_store(store.orthanc) as url, _storage_scp("DEST") as (port, received):
        gateway = _gateway(
            stowaway, url, destinations=f'[{{"name": "DEST", "host": "127.0.0.1", "port": {port}}}]'
        )
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title=AET)
        statuses: list[Dataset] = []
        try:
            responses = assoc.send_c_move(
                _study_key(study), "DEST", StudyRootQueryRetrieveInformationModelMove, msg_id=9
            )
            for status, _ in responses:
                statuses.append(status)
                if status.Status == 0xFF00 and len(statuses) == 1:
                    context_id = next(iter(assoc._accepted_cx.values())).context_id
                    assoc.send_c_cancel(9, context_id)
        finally:
            assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
    assert final.NumberOfRemainingSuboperations > 0
    assert len(received) < len(store.studies[study])


def test_c_cancel_stops_a_find_before_its_last_page(
    stowaway: StowawayFactory, store: Store
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = ""
    answers = _pynetdicom_find(
        gateway.port, identifier, StudyRootQueryRetrieveInformationModelFind, cancel_after=1
    )
    statuses = [status.Status for status, _ in answers]
    assert statuses[-1] == 0xFE00, statuses
    assert statuses.count(0xFF00) < len(store.orthanc.instance_uids())
    assert "c_find_cancelled" in gateway.log()


def _pynetdicom_get(port: int, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=AET,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)],
    )
    assert assoc.is_established
    try:
        return [
            status
            for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()


@contextlib.contextmanager
def _silent_store() -> Iterator[str]:
    """A DICOMweb URL whose server takes the connection and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"


def test_a_silent_store_times_out_and_a_busy_peer_is_refused(
    stowaway: StowawayFactory,
) -> None:
    with _silent_store() as url:
        gateway = _gateway(stowaway, url, "--query-timeout", "2", "--query-max-per-peer", "1")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        first: list[list[tuple[Dataset, Dataset | None]]] = []
        waiting = threading.Thread(
            target=lambda: first.append(
                _pynetdicom_find(
                    gateway.port, identifier, StudyRootQueryRetrieveInformationModelFind
                )
            )
        )
        started = time.monotonic()
        waiting.start()
        time.sleep(0.7)
        [(busy, _)] = _pynetdicom_find(
            gateway.port, identifier, StudyRootQueryRetrieveInformationModelFind
        )
        waiting.join(30)
    assert busy.Status == 0xA700
    assert "--query-max-per-peer" in busy.ErrorComment
    [[(timed_out, _)]] = first
    assert 1.5 < time.monotonic() - started < 15
    assert timed_out.Status == 0xA700
    assert "timed out" in timed_out.ErrorComment
    assert "--query-timeout" in gateway.log()


def test_a_403_names_its_cause_as_check_does(stowaway: StowawayFactory) -> None:
    with HealthcareStub() as stub:
        stub.script(Fault.iam_denied(times=2))
        gateway = _gateway(stowaway, stub.base_url)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        [(found, _)] = _pynetdicom_find(gateway.port, identifier, STUDY_FIND)
        [got] = _pynetdicom_get(gateway.port, identifier)
    explained = "the service account lacks roles/healthcare.dicomEditor on the DICOM store"
    for status in (found, got):
        assert status.Status == 0x0124
        assert status.ErrorComment.startswith("Store: the service account lacks roles/")
    assert explained in gateway.log()


def test_a_find_over_the_result_limit_ends_with_a_reason(
    stowaway: StowawayFactory, store: Store
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url, "--query-max-results", "3")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = ""
    statuses = [
        s.Status
        for s, _ in _pynetdicom_find(
            gateway.port, identifier, StudyRootQueryRetrieveInformationModelFind
        )
    ]
    assert statuses == [0xFF00] * 3 + [0xA700]


def test_store_down_fails_find_move_and_get_with_a_reason(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"
    gateway = _gateway(
        stowaway,
        nowhere,
        destinations=f'[{{"name": "SOMEWHERE", "host": "127.0.0.1", "port": {free_port()}}}]',
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    [(status, _)] = _pynetdicom_find(
        gateway.port, identifier, PatientRootQueryRetrieveInformationModelFind
    )
    assert status.Status == 0xA700
    assert "unreachable" in status.ErrorComment
    identifier.StudyInstanceUID = "1.2.3"
    final = _pynetdicom_move(gateway.port, identifier, "SOMEWHERE")[-1]
    assert final.Status == 0xA701
    assert "unreachable" in final.ErrorComment
    [final] = _pynetdicom_get(gateway.port, identifier)
    assert final.Status == 0xA701
    assert "unreachable" in final.ErrorComment


# ---------------------------------------------------------------------------- C-MOVE


def _pynetdicom_move(port: int, identifier: Dataset, destination: str) -> list[Dataset]:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    try:
        return [
            status
            for status, _ in assoc.send_c_move(
                identifier, destination, StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()


def test_unknown_or_unreachable_move_destination_is_a801_with_a_reason(
    stowaway: StowawayFactory, store: Store
) -> None:
    gateway = _gateway(
        stowaway,
        store.orthanc.dicomweb_url,
        destinations=f'[{{"name": "DOWN", "host": "127.0.0.1", "port": {free_port()}}}]',
    )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = next(iter(store.studies))
    [final] = _pynetdicom_move(gateway.port, identifier, "NOBODY")
    assert final.Status == 0xA801
    assert "NOBODY" in final.ErrorComment
    [final] = _pynetdicom_move(gateway.port, identifier, "DOWN")
    assert final.Status == 0xA801
    assert "DOWN refused or unreachable" in final.ErrorComment
    # Nothing to move: Success with no sub-operations, the destination never called.
    [final] = _pynetdicom_move(gateway.port, _study_key("1.2.3.999"), "DOWN")
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 0)


def _assert_same_as_orthanc(received: list[Path], store: Store, study: str) -> None:
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    assert sorted(got) == sorted(store.studies[study])
    for sop, path in got.items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(store.orthanc.instance_bytes(sop))


def test_movescu_to_itself_gets_the_study_byte_identical(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    port = free_port()
    gateway = _gateway(
        stowaway,
        store.orthanc.dicomweb_url,
        # Google's lenient format: single quotes, an unquoted key, a trailing comma.
        destinations=f"[{{'name': 'MOVESCU', host: '127.0.0.1', 'port': {port},}},]",
    )
    study = next(iter(store.studies))
    out = tmp_path / "moved"
    out.mkdir()
    run = subprocess.run(
        [
            MOVESCU, "-v", "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", AET,
            "--port", str(port), "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            "127.0.0.1", str(gateway.port),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Received Final Move Response (Success)" in output, output
    _assert_same_as_orthanc(sorted(out.iterdir()), store, study)


def test_move_counts_are_in_the_command_set_and_calling_aet_is_cmove_aet(
    stowaway: StowawayFactory, store: Store
) -> None:
    study = max(store.studies, key=lambda s: len(store.studies[s]))
    with _storage_scp("DEST") as (port, received):
        gateway = _gateway(
            stowaway,
            store.orthanc.dicomweb_url,
            "--dimse_cmove_aet",
            "RETRIEVER",
            destinations=f'[{{"name": "DEST", "host": "127.0.0.1", "port": {port}}}]',
        )
        statuses = _pynetdicom_move(gateway.port, _study_key(study), "DEST")
    total = len(store.studies[study])
    pending = [s for s in statuses if s.Status == 0xFF00]
    assert [s.NumberOfRemainingSuboperations for s in pending] == list(range(total - 1, -1, -1))
    assert [s.NumberOfCompletedSuboperations for s in pending] == list(range(1, total + 1))
    final = statuses[-1]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (total, 0)
    assert sorted(sop for _, sop in received) == sorted(store.studies[study])
    assert {aet for aet, _ in received} == {"RETRIEVER"}


def test_move_to_a_destination_refusing_some_reports_partial_failure(
    stowaway: StowawayFactory, store: Store
) -> None:
    study = max(store.studies, key=lambda s: len(store.studies[s]))
    refused = sorted(store.studies[study])[0]
    with _storage_scp("DEST", lambda sop: 0xA700 if sop == refused else 0x0000) as (port, _):
        gateway = _gateway(
            stowaway,
            store.orthanc.dicomweb_url,
            destinations=f'[{{"name": "DEST", "host": "127.0.0.1", "port": {port}}}]',
        )
        final = _pynetdicom_move(gateway.port, _study_key(study), "DEST")[-1]
    total = len(store.studies[study])
    assert final.Status == 0xB000  # sub-operations complete, one or more failures
    counts = (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations)
    assert counts == (total - 1, 1)


def test_an_instance_gone_from_the_store_is_one_failed_sub_operation(
    stowaway: StowawayFactory, store: Store
) -> None:
    study = max(store.studies, key=lambda s: len(store.studies[s]))
    gone: list[str] = []

    def status_of(sop: str) -> int:
        if not gone:
            # At the first C-STORE, delete another instance: the search found it, its
            # WADO-RS comes later.
            victim = next(other for other in sorted(store.studies[study]) if other != sop)
            store.orthanc.request("DELETE", f"/instances/{store.orthanc.orthanc_id(victim)}")
            gone.append(victim)
        return 0x0000

    with _storage_scp("DEST", status_of) as (port, received):
        gateway = _gateway(
            stowaway,
            store.orthanc.dicomweb_url,
            destinations=f'[{{"name": "DEST", "host": "127.0.0.1", "port": {port}}}]',
        )
        final = _pynetdicom_move(gateway.port, _study_key(study), "DEST")[-1]
    total = len(store.studies[study])
    assert final.Status == 0xB000
    counts = (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations)
    assert counts == (total - 1, 1)
    assert sorted(sop for _, sop in received) == sorted(set(store.studies[study]) - set(gone))
    assert "c_move_instance_failed" in gateway.log()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_instance_is_moved_from_its_file_not_encoded_again_in_memory(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    big = make_ct(tmp_path / "big.dcm", 4096, 4096, seed=11)  # 32 MiB of pixels
    size = big.stat().st_size
    orthanc.stow([big.read_bytes()])
    study = str(pydicom.dcmread(big, stop_before_pixels=True).StudyInstanceUID)
    with _storage_scp("DEST") as (port, received):
        gateway = _gateway(
            stowaway,
            orthanc.dicomweb_url,
            destinations=f'[{{"name": "DEST", "host": "127.0.0.1", "port": {port}}}]',
        )
        assert gateway.proc is not None
        before = _peak_rss_kib(gateway.proc.pid)
        final = _pynetdicom_move(gateway.port, _study_key(study), "DEST")[-1]
        grown = (_peak_rss_kib(gateway.proc.pid) - before) * 1024
    assert final.Status == 0x0000 and len(received) == 1
    # Encoded again by pynetdicom it took three times its size; from its file, about one.
    assert grown < 1.5 * size, f"peak memory grew by {grown / size:.1f} times the instance"


def _study_key(study: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


# ---------------------------------------------------------------------------- C-GET


def test_getscu_gets_the_series_byte_identical(
    stowaway: StowawayFactory, store: Store, tmp_path: Path
) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    study = next(iter(store.studies))
    out = tmp_path / "got"
    out.mkdir()
    run = subprocess.run(
        [
            GETSCU, "-v", "-S", "-aec", AET, "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            "127.0.0.1", str(gateway.port),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Received C-GET Response (Success)" in output, output
    completed = f"Number of Completed Suboperations : {len(store.studies[study])}"
    assert completed in output, output
    _assert_same_as_orthanc(sorted(out.iterdir()), store, study)


# ---------------------------------------------------------------------------- PixelMed


def _pixelmed(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["java", "-cp", PIXELMED, f"com.pixelmed.network.{tool}", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


needs_pixelmed = pytest.mark.skipif(not Path(PIXELMED).is_file(), reason="no pixelmed-apps")


@contextlib.contextmanager
def _storage_scp(
    aet: str, status_of: Callable[[str], int] = lambda _sop: 0x0000
) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """A pynetdicom storage SCP on a free port; yields the port and what it received
    as (calling AE title, SOP Instance UID)."""
    received: list[tuple[str, str]] = []

    def on_store(event: Event) -> int:
        sop = str(event.dataset.SOPInstanceUID)
        received.append((str(event.assoc.requestor.ae_title).strip(), sop))
        return status_of(sop)

    ae = AE(ae_title=aet)
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, received
    finally:
        server.shutdown()


@needs_pixelmed
def test_pixelmed_find_and_move(stowaway: StowawayFactory, store: Store, tmp_path: Path) -> None:
    with _storage_scp("PIXDEST") as (port, received):
        gateway = _gateway(
            stowaway,
            store.orthanc.dicomweb_url,
            destinations=f'[{{"name": "PIXDEST", "host": "127.0.0.1", "port": {port}}}]',
        )
        port_text = str(gateway.port)
        # FindSOPClassSCU's main() asks, at IMAGE level, for one built-in series.
        find = _pixelmed("FindSOPClassSCU", "127.0.0.1", port_text, AET, "PIXELMED", cwd=tmp_path)
        assert find.returncode == 0, find.stdout + find.stderr
        for sop in store.studies[PIXELMED_STUDY]:
            assert sop in find.stdout + find.stderr
        move = _pixelmed(
            "MoveSOPClassSCU", "127.0.0.1", port_text, AET, "PIXELMED", "PIXDEST",
            "STUDY", PIXELMED_STUDY, cwd=tmp_path,
        )  # fmt: skip
        assert move.returncode == 0, move.stdout + move.stderr
        assert "final status = 0x0" in move.stdout + move.stderr
    assert sorted(sop for _, sop in received) == sorted(store.studies[PIXELMED_STUDY])


@needs_pixelmed
def test_pixelmed_get(stowaway: StowawayFactory, store: Store, tmp_path: Path) -> None:
    gateway = _gateway(stowaway, store.orthanc.dicomweb_url)
    got = tmp_path / "pixelmed-got"
    got.mkdir()
    get = _pixelmed(
        "GetSOPClassSCU", "127.0.0.1", str(gateway.port), AET, "PIXELMED", str(got),
        "STUDY", PIXELMED_STUDY, cwd=tmp_path,
    )  # fmt: skip
    output = get.stdout + get.stderr
    if "Too many presentation contexts" in output:
        # Its main() proposes every storage SOP class in every transfer syntax, more than
        # the 128 contexts an association may have, and gives up before connecting.
        pytest.skip("PixelMed GetSOPClassSCU main() proposes more than 128 contexts")
    assert get.returncode == 0, output
    files = [p for p in got.rglob("*") if p.is_file()]
    _assert_same_as_orthanc(files, store, PIXELMED_STUDY)


def test_without_credentials_for_the_store_the_receiver_still_receives(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    google = "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
    gateway = stowaway(
        "receive",
        "--query-url",
        google,
        env={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing-key.json")},
    )
    echo = subprocess.run(
        [ECHOSCU, "-aec", AET, "127.0.0.1", str(gateway.port)], capture_output=True, timeout=30
    )
    assert echo.returncode == 0
    assert "query_retrieve_disabled" in gateway.log()
