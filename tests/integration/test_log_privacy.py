"""Logs carry UIDs, never patient names or IDs; the HTTP endpoints carry counts only.

A ``serve`` at ``--log-level debug`` receives instances of a distinctively named
patient: one forwarded, one the destination refuses (409, kept as failed), one
that cannot be stored (no Study Instance UID, answered 0xC210). Every log line,
the operator's commands and the HTTP endpoints are then searched for the name
and the ID.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from stowaway.db.engine import make_engine
from stowaway.db.models import Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.support import scu
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub
from tests.support.processes import dcmsend
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(180)

FAMILY, GIVEN, PATIENT_ID = "Quackenbush", "Zebulon", "PID-73194-XQ"
PATIENT_NAME = f"{FAMILY}^{GIVEN}"
OTHER_NAMES = "Hortensia Birthname"  # PatientBirthName, OtherPatientNames
FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "500ms")


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is logged does not depend on the queue database."""
    yield sqlite_url(tmp_path)


def patient_ct(path: Path, seed: int, **uids: str) -> Path:
    make_ct(path, seed=seed, patient_name=PATIENT_NAME, patient_id=PATIENT_ID, **uids)
    ds = pydicom.dcmread(path)
    ds.OtherPatientNames = OTHER_NAMES.split()[0]
    ds.PatientBirthName = OTHER_NAMES.split()[1]
    ds.save_as(path, enforce_file_format=True)
    return path


def failed_rows(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        return sum(1 for row in Queue(engine).rows() if row.status == Status.FAILED)
    finally:
        engine.dispose()


def get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return body


def test_patient_data_never_reaches_logs_or_endpoints(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    with HealthcareStub() as stub:
        proc = stowaway(
            "serve",
            *("--dicomweb-url", stub.base_url, "--auth", "none", *FAST),
            *("--log-level", "debug", "--log-format", "json"),
        )
        good = patient_ct(tmp_path / "good.dcm", seed=11)
        assert dcmsend(proc.port, [good]).returncode == 0
        uids = read_uids(good)
        wait_until(lambda: uids.sop_uid in stub.stored, timeout=60)
        # The same SOP Instance UID with other pixels: the destination answers 409.
        clash = patient_ct(tmp_path / "clash.dcm", seed=12, sop_uid=uids.sop_uid)
        assert dcmsend(proc.port, [clash]).returncode == 0
        wait_until(lambda: failed_rows(proc.db_url), timeout=60)
        # No Study Instance UID: refused with 0xC210 and an ErrorComment.
        broken = patient_ct(tmp_path / "broken.dcm", seed=13)
        ds = pydicom.dcmread(broken)
        del ds.StudyInstanceUID
        with scu.associate(
            proc.port, contexts=[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
        ) as assoc:
            status = assoc.send_c_store(ds)
        assert status.Status == 0xC210
        assert FAMILY not in str(status.get("ErrorComment", ""))
        endpoints = {path: get(proc.http_port, path) for path in ("/metrics", "/readyz")}
        failed = json.loads(proc.cli("queue", "ls", "--json", "--status", "failed").stdout)
        assert failed, "the 409 did not leave a failed row"
        outputs = {
            "queue ls --json": proc.cli("queue", "ls", "--json").stdout,
            "queue show (failed)": proc.cli("queue", "show", str(failed[0]["id"])).stdout,
            **endpoints,
        }
        assert proc.stop() == 0
    log = proc.log()
    lines = log.splitlines()
    assert all(line.startswith("{") for line in lines), "not all log lines are JSON"
    debug = [json.loads(line) for line in lines if '"severity": "DEBUG"' in line]
    assert debug, "no debug lines were logged"
    assert uids.sop_uid in log, "the log should name instances by UID"
    for where, text in {"log": log, **outputs}.items():
        for needle in (FAMILY, GIVEN, PATIENT_ID, *OTHER_NAMES.split()):
            assert needle not in text, f"{needle!r} in {where}"
    for path, body in endpoints.items():
        for uid in (uids.sop_uid, uids.study_uid, uids.series_uid):
            assert uid not in body, f"a UID in {path}"
