"""Routing end to end: one serve process, rules choosing among two Orthancs (DICOMweb)
and DCMTK's storescp (DIMSE); a destination that is down holds back no other and catches
up when it is back; an instance no rule routes stays visible as unrouted."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.conftest import StowawayFactory
from tests.support.dicom_files import dataset_bytes, make_study, read_uids
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.processes import dcmsend, free_port, storescp
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(240)

FAST = ("--poll-interval", "100ms", "--backoff-initial", "200ms", "--backoff-max", "1s")


@pytest.fixture
def research(tmp_path: Path) -> Iterator[OrthancServer]:
    """A second Orthanc, not started: each test decides when it is up."""
    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "research", aet="RESEARCH", http_port=free_port())
    yield server
    if server.is_running():
        server.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with storescp(tmp_path / "pacs", "PACS") as port:
        yield port, tmp_path / "pacs"


def instances(directory: Path, n: int, modality: str, seed: int) -> list[Path]:
    paths = make_study(directory, n, rows=16, cols=16, seed=seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = modality
        ds.save_as(path, enforce_file_format=True)
    return paths


def destinations_file(tmp_path: Path, clinical: str, research_port: int, pacs_port: int) -> Path:
    path = tmp_path / "destinations.yaml"
    path.write_text(
        f"""
destinations:
  - {{name: clinical, kind: dicomweb, url: "{clinical}", auth: none}}
  - {{name: research, kind: dicomweb, url: "http://127.0.0.1:{research_port}/dicom-web",
     auth: none}}
  - {{name: pacs, kind: dimse, host: 127.0.0.1, port: {pacs_port}, called_aet: PACS}}
matching: all
rules:
  - name: mammography
    when: {{Modality: MG}}
    to: [research, clinical]
  - name: from-the-ct
    when: {{calling_aet: CTSCAN}}
    to: [pacs, clinical]
"""
    )
    return path


def uids(paths: list[Path]) -> set[str]:
    return {read_uids(p).sop_uid for p in paths}


def test_each_instance_reaches_the_stores_its_rules_choose_and_a_down_one_catches_up(
    stowaway: StowawayFactory,
    orthanc: OrthancServer,
    research: OrthancServer,
    pacs: tuple[int, Path],
    tmp_path: Path,
) -> None:
    pacs_port, pacs_dir = pacs
    # research is down until later, at its known port
    config = destinations_file(tmp_path, orthanc.dicomweb_url, research.http_port, pacs_port)
    mg = instances(tmp_path / "mg", 2, "MG", seed=1)
    ct = instances(tmp_path / "ct", 3, "CT", seed=2)
    us = instances(tmp_path / "us", 1, "US", seed=3)
    proc = stowaway("serve", "--destinations", str(config), "--sender-first", "0", *FAST)
    for files, aet in ((mg, "MAMMO"), (ct, "CTSCAN"), (us, "ULTRA")):
        sent = dcmsend(proc.port, files, "IMPORTADAPTER", "-aet", aet)
        assert sent.returncode == 0, sent.stderr

    # research is down: the others fill regardless
    wait_until(lambda: orthanc.instance_uids() == uids(mg) | uids(ct), 60)
    wait_until(lambda: {read_uids(p).sop_uid for p in pacs_dir.iterdir()} == uids(ct), 60)
    for path in ct:
        stored = next(
            p for p in pacs_dir.iterdir() if read_uids(p).sop_uid == read_uids(path).sop_uid
        )
        assert dataset_bytes(stored.read_bytes()) == dataset_bytes(path.read_bytes())
    for path in mg:
        assert orthanc.instance_bytes(read_uids(path).sop_uid) == path.read_bytes() or (
            dataset_bytes(orthanc.instance_bytes(read_uids(path).sop_uid))
            == dataset_bytes(path.read_bytes())
        )
    # the unrouted instance is kept, visible
    listed = json.loads(proc_cli(proc, "queue", "ls", "--status", "unrouted", "--json").stdout)
    assert [row["sop_instance_uid"] for row in listed] == sorted(uids(us))

    research.start()  # back: it catches up by itself
    wait_until(lambda: research.instance_uids() == uids(mg), 60)

    # The store has them a moment before our rows say done and the files go.
    def waiting() -> dict[str, int]:
        stats = json.loads(proc_cli(proc, "queue", "stats", "--json").stdout)
        by_name = {d["name"]: d for d in stats["destinations"]}
        return {n: by_name[n]["pending"] for n in ("clinical", "research", "pacs")}

    wait_until(lambda: waiting() == {"clinical": 0, "research": 0, "pacs": 0}, 30)

    # every spool file whose deliveries are all done is gone; the unrouted one stays
    def spool() -> list[Path]:
        return sorted((proc.data_dir / "spool").glob("[0-9]*/*/*/*/*.dcm"))

    wait_until(lambda: len(spool()) == 1, 30)


def test_googles_destination_config_routes_as_googles_adapter_would(
    stowaway: StowawayFactory, orthanc: OrthancServer, research: OrthancServer, tmp_path: Path
) -> None:
    research.start()
    google = json.dumps([{"filter": "Modality=MG", "dicomweb_destination": research.dicomweb_url}])
    mg = instances(tmp_path / "mg", 2, "MG", seed=4)
    ct = instances(tmp_path / "ct", 2, "CT", seed=5)
    proc = stowaway(
        "serve",
        "--dicomweb_address",
        orthanc.dicomweb_url,
        "--destination_config_inline",
        google,
        "--sender-first",
        "0",
        *FAST,
    )
    sent = dcmsend(proc.port, [*mg, *ct])
    assert sent.returncode == 0, sent.stderr
    # first match wins; what matches nothing goes to --dicomweb_address
    wait_until(lambda: research.instance_uids() == uids(mg), 60)
    wait_until(lambda: orthanc.instance_uids() == uids(ct), 60)


def proc_cli(proc: object, *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    data_dir = proc.data_dir  # type: ignore[attr-defined]
    db_url = proc.db_url  # type: ignore[attr-defined]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stowaway.cli",
            *args,
            "--data-dir",
            str(data_dir),
            "--db-url",
            db_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_a_forbidden_store_holds_back_no_other_and_drains_once_the_role_is_granted(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path
) -> None:
    from tests.support.healthcare_stub import Fault, HealthcareStub

    study = instances(tmp_path / "ct", 4, "CT", seed=6)
    with HealthcareStub() as cloud:
        cloud.fault = Fault.iam_denied(times=10**6)  # roles/healthcare.dicomEditor missing
        config = tmp_path / "destinations.yaml"
        config.write_text(
            "destinations:\n"
            f"  - {{name: cloud, kind: dicomweb, url: '{cloud.base_url}', auth: none}}\n"
            f"  - {{name: local, kind: dicomweb, url: '{orthanc.dicomweb_url}', auth: none}}\n"
            "matching: all\n"
            "rules: [{name: both, to: [cloud, local]}]\n"
        )
        proc = stowaway("serve", "--destinations", str(config), "--sender-first", "0", *FAST)
        sent = dcmsend(proc.port, study)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: orthanc.instance_uids() == uids(study), 60)

        def cloud_state() -> dict[str, object]:
            stats = json.loads(proc_cli(proc, "queue", "stats", "--json").stdout)
            return {d["name"]: d for d in stats["destinations"]}["cloud"]

        wait_until(lambda: cloud_state()["state"] == "blocked", 30)
        assert "roles/healthcare.dicomEditor" in str(cloud_state()["reason"])
        assert cloud.stored == {}
        cloud.fault = None  # the role is granted
        wait_until(lambda: set(cloud.stored) == uids(study), 60)
        wait_until(lambda: cloud_state()["state"] == "ok", 30)
