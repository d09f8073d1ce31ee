"""End to end into a real Orthanc: DCMTK -> stowaway serve -> STOW-RS -> Orthanc."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.models import Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.support.dicom_files import dataset_bytes, make_study, read_uids
from tests.support.orthanc import OrthancServer
from tests.support.processes import dcmsend
from tests.support.seeding import wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(240)

FAST = ("--poll-interval", "100ms", "--backoff-initial", "200ms", "--backoff-max", "1s")


def counts(db_url: str) -> dict[Status, int]:
    engine = make_engine(db_url)
    try:
        return Queue(engine).stats().counts
    finally:
        engine.dispose()


def spool_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "spool").glob("[0-9]*/*/*/*/*.dcm"))


def test_serve_delivers_every_instance_to_orthanc(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path, db_url: str
) -> None:
    files = make_study(tmp_path / "study", 20, rows=128, cols=128, seed=7)
    proc = stowaway("serve", "--dicomweb-url", orthanc.dicomweb_url, *FAST)
    result = dcmsend(proc.port, files)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: counts(db_url)[Status.DONE] == 20, timeout=60)
    assert orthanc.instance_uids() == {read_uids(f).sop_uid for f in files}
    for f in files[:3]:
        stored = orthanc.instance_bytes(read_uids(f).sop_uid)
        assert dataset_bytes(stored) == dataset_bytes(f.read_bytes())
    assert spool_files(proc.data_dir) == []
    rows = json.loads(proc.cli("queue", "ls", "--json").stdout)
    assert {r["status"] for r in rows} == {"done"}
    assert all(r["forwarded_at"] for r in rows)
    assert proc.stop() == 0


def test_destination_down_for_a_while(
    stowaway: StowawayFactory, orthanc: OrthancServer, tmp_path: Path, db_url: str
) -> None:
    files = make_study(tmp_path / "study", 10, seed=8)
    with TcpProxy(orthanc.http_port) as proxy:
        proxy.cut()  # the network to the destination is down from the start
        url = f"http://127.0.0.1:{proxy.port}/dicom-web"
        proc = stowaway("serve", "--dicomweb-url", url, *FAST)
        assert dcmsend(proc.port, files).returncode == 0  # the sender is not held hostage
        wait_until(lambda: "connection" in proc.log().lower() and "instance_retry" in proc.log())
        time.sleep(1.0)
        assert counts(db_url)[Status.DONE] == 0
        assert orthanc.count() == 0
        proxy.restore()
        wait_until(lambda: counts(db_url)[Status.DONE] == 10, timeout=60)
    assert orthanc.instance_uids() == {read_uids(f).sop_uid for f in files}
    assert spool_files(proc.data_dir) == []
