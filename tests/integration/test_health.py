"""/healthz, /readyz and /metrics of real stowaway processes, fed by DCMTK.

* ``/metrics`` values move as instances are received and forwarded;
* ``/readyz`` turns 503 when the queue database becomes unreachable (SQLite file
  moved away; Postgres behind a proxy that is cut), while C-STORE requests are
  answered 0xA700 with the reason;
* ``/readyz`` turns 503 when free disk is below ``--min-free-disk``, and the DICOM
  ports (plain and TLS) are closed then (echoscu is refused);
* a blocked destination never makes the process unready.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from tests.conftest import StowawayFactory
from tests.support.certs import TestCA
from tests.support.dicom_files import make_study
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.processes import ECHOSCU, StowawayProcess, dcmsend, free_port
from tests.support.seeding import wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(180)

FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "500ms")
#: The labels of the upload metrics of a --dicomweb-url destination.
DEFAULT = "destination=default"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # never a proxy for loopback
    yield session
    session.close()


def get(http: requests.Session, proc: StowawayProcess, path: str) -> requests.Response:
    return http.get(f"http://127.0.0.1:{proc.http_port}{path}", timeout=10)


def scrape(http: requests.Session, proc: StowawayProcess) -> dict[tuple[str, str], float]:
    """``{(sample name, "k=v,..."): value}`` of one /metrics scrape."""
    response = get(http, proc, "/metrics")
    assert response.status_code == 200
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[(sample.name, labels)] = sample.value
    return out


def metric(http: requests.Session, proc: StowawayProcess, name: str, labels: str = "") -> float:
    return scrape(http, proc).get((name, labels), float("nan"))


def readyz(http: requests.Session, proc: StowawayProcess) -> tuple[int, dict[str, Any]]:
    response = get(http, proc, "/readyz")
    return response.status_code, response.json()


def http_up(http: requests.Session, proc: StowawayProcess) -> bool:
    try:
        return get(http, proc, "/healthz").status_code == 200
    except requests.ConnectionError:
        return False


def echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "-v", "-aec", "IMPORTADAPTER", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def queue_rows(proc: StowawayProcess) -> list[dict[str, Any]]:
    return list(json.loads(proc.cli("queue", "ls", "--json").stdout))


def test_metrics_move_as_instances_are_received(
    stowaway: StowawayFactory, tmp_path: Path, http: requests.Session
) -> None:
    proc = stowaway("receive")
    before = scrape(http, proc)
    assert before[("stowaway_instances_received_total", "status=success")] == 0
    assert before[("stowaway_queue_instances", "status=pending")] == 0
    assert before[("stowaway_ready", "")] == 1
    assert before[("stowaway_receiver_paused", "")] == 0
    assert before[("process_resident_memory_bytes", "")] > 0

    files = make_study(tmp_path / "study", 3, rows=64, cols=64, seed=51)
    result = dcmsend(proc.port, files)
    assert result.returncode == 0, result.stderr
    wrong_ae = subprocess.run(
        [ECHOSCU, "-aec", "SOMEONEELSE", "127.0.0.1", str(proc.port)],
        capture_output=True,
        timeout=30,
    )
    assert wrong_ae.returncode != 0
    stored = sum(r["size_bytes"] for r in queue_rows(proc))

    # The queue gauges are cached for 2 s; the counters move at once.
    wait_until(lambda: metric(http, proc, "stowaway_queue_instances", "status=pending") == 3, 10)
    wait_until(lambda: metric(http, proc, "stowaway_associations_open") == 0, 10)
    after = scrape(http, proc)
    assert after[("stowaway_instances_received_total", "status=success")] == 3
    assert after[("stowaway_instances_received_total", "status=refused")] == 0
    assert after[("stowaway_received_bytes_total", "")] == stored
    assert after[("stowaway_cstore_duration_seconds_count", "")] == 3
    assert 0 < after[("stowaway_cstore_duration_seconds_sum", "")] < 30
    assert after[("stowaway_associations_total", "outcome=accepted")] == 1
    assert after[("stowaway_associations_total", "outcome=rejected")] == 1
    assert after[("stowaway_queue_bytes", "status=pending")] == stored
    assert after[("stowaway_queue_instances", "status=done")] == 0
    assert 0 <= after[("stowaway_queue_oldest_pending_age_seconds", "")] < 60
    assert after[("stowaway_spool_free_bytes", "")] > 0
    assert proc.stop() == 0


def test_forwarding_metrics_and_a_blocked_destination_never_make_it_unready(
    stowaway: StowawayFactory, tmp_path: Path, http: requests.Session
) -> None:
    with HealthcareStub() as stub:
        stub.script(Fault.iam_denied(times=10_000))
        proc = stowaway("serve", "--dicomweb-url", stub.base_url, *FAST)
        assert metric(http, proc, "stowaway_destination_blocked", "destination=default") == 0
        files = make_study(tmp_path / "study", 4, rows=64, cols=64, seed=52)
        assert dcmsend(proc.port, files).returncode == 0
        sizes = sum(r["size_bytes"] for r in queue_rows(proc))

        wait_until(
            lambda: metric(http, proc, "stowaway_destination_blocked", "destination=default") == 1,
            30,
        )
        status, body = readyz(http, proc)
        assert status == 200, body
        assert set(body["checks"]) == {"database", "spool", "disk"}
        assert (
            metric(http, proc, "stowaway_instances_failed_total", f"{DEFAULT},outcome=blocked") >= 1
        )
        assert metric(http, proc, "stowaway_receiver_paused") == 0
        assert echo(proc.port).returncode == 0

        stub.fault = None  # the operator fixes IAM
        wait_until(
            lambda: metric(http, proc, "stowaway_instances_forwarded_total", DEFAULT) == 4, 60
        )
        wait_until(lambda: metric(http, proc, "stowaway_queue_instances", "status=done") == 4, 10)
        wait_until(
            lambda: metric(http, proc, "stowaway_destination_blocked", "destination=default") == 0,
            10,
        )
        after = scrape(http, proc)
        assert after[("stowaway_upload_duration_seconds_count", f"{DEFAULT},outcome=success")] >= 1
        assert after[("stowaway_upload_size_bytes_sum", DEFAULT)] >= sizes
        assert after[("stowaway_queue_instances", "status=pending")] == 0
        assert after[("stowaway_instances_failed_total", f"{DEFAULT},outcome=permanent")] == 0
        assert proc.stop() == 0


def test_readyz_follows_the_database_while_stores_are_refused_with_a_reason(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, http: requests.Session
) -> None:
    proxy: TcpProxy | None = None
    extra: tuple[str, ...] = ()
    sqlite_file = tmp_path / "queue.db"
    if db_url.startswith("postgresql"):
        # The network to Postgres goes through a proxy we can cut.
        url = make_url(db_url)
        proxy = TcpProxy(url.port or 5432, url.host or "127.0.0.1")
        proxy.restore()
        proxied = url.set(host="127.0.0.1", port=proxy.port)
        extra = ("--db-url", proxied.render_as_string(hide_password=False))
    else:
        assert db_url.endswith(str(sqlite_file))
    files = make_study(tmp_path / "study", 2, rows=64, cols=64, seed=53)
    try:
        proc = stowaway("receive", *extra)
        status, body = readyz(http, proc)
        assert (status, body["checks"]["database"]["ok"]) == (200, True), body

        if proxy is not None:
            proxy.cut()
        else:
            # The pool's open connections would go on writing to the moved file;
            # readiness looks at the path, where the database is gone.
            sqlite_file.rename(tmp_path / "moved-away.db")
        wait_until(lambda: readyz(http, proc)[0] == 503, 15)
        status, body = readyz(http, proc)
        assert body["reason"].startswith("database: ")
        assert body["checks"]["spool"]["ok"] and body["checks"]["disk"]["ok"]
        assert http_up(http, proc)  # alive, only not ready
        assert metric(http, proc, "stowaway_ready") == 0
        # The DICOM port stays open: each C-STORE gets 0xA700 and its reason.
        assert metric(http, proc, "stowaway_receiver_paused") == 0
        assert echo(proc.port).returncode == 0
        if proxy is not None:
            refused = dcmsend(proc.port, files[:1])
            output = refused.stdout + refused.stderr
            assert "Refused: OutOfResources" in output, output
            assert metric(http, proc, "stowaway_instances_received_total", "status=refused") == 1

        if proxy is not None:
            proxy.restore()
        else:
            (tmp_path / "moved-away.db").rename(sqlite_file)
        wait_until(lambda: readyz(http, proc)[0] == 200, 20)
        assert dcmsend(proc.port, files).returncode == 0
        assert metric(http, proc, "stowaway_instances_received_total", "status=success") == 2
        assert "not_ready" in proc.log() and "receiver_paused" not in proc.log()
        assert proc.stop() == 0
    finally:
        if proxy is not None:
            proxy.cut()


@SQLITE_ONLY
def test_disk_below_the_threshold_closes_the_dicom_ports(
    stowaway: StowawayFactory, tmp_path: Path, http: requests.Session
) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("server", server=True)
    tls_port = free_port()
    tls = (
        "--tls-port",
        str(tls_port),
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
    )
    proc = stowaway("receive", "--min-free-disk", "1000TiB", *tls, wait_port=False)
    wait_until(lambda: http_up(http, proc), 20)
    status, body = readyz(http, proc)
    assert status == 503
    assert body["checks"]["disk"]["ok"] is False
    assert "below --min-free-disk 1000.0 TiB" in body["reason"]
    assert body["checks"]["database"]["ok"] and body["checks"]["spool"]["ok"]
    wait_until(lambda: metric(http, proc, "stowaway_receiver_paused") == 1, 10)
    assert metric(http, proc, "stowaway_ready") == 0

    refused = echo(proc.port)
    assert refused.returncode != 0 and "refused" in (refused.stdout + refused.stderr).lower()
    assert refuses_connections(proc.port) and refuses_connections(tls_port)
    files = make_study(tmp_path / "study", 1, rows=64, cols=64, seed=54)
    assert dcmsend(proc.port, files).returncode != 0
    assert queue_rows(proc) == []
    log = proc.log()
    assert "receiver_paused" in log and "min-free-disk" in log
    assert proc.stop() == 0  # a paused receiver still stops cleanly


@SQLITE_ONLY
def test_the_forwarder_stays_ready_when_the_disk_is_low(
    stowaway: StowawayFactory, http: requests.Session
) -> None:
    # The forwarder is what frees the disk; the pod is unready through the receiver.
    proc = stowaway(
        "forward", "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--min-free-disk", "1000TiB"
    )
    wait_until(lambda: http_up(http, proc), 20)
    status, body = readyz(http, proc)
    assert status == 200, body
    assert set(body["checks"]) == {"database", "spool"}
    assert metric(http, proc, "stowaway_destination_blocked", "destination=default") == 0
    assert proc.stop() == 0
