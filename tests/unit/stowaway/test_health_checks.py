"""stowaway.health: readiness checks against real files and databases, and the HTTP server."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from stowaway.db.engine import make_engine
from stowaway.db.spool import Spool
from stowaway.health import (
    CheckFailed,
    HealthMonitor,
    HealthServer,
    Readiness,
    ReadinessReport,
    database_check,
    disk_check,
    readiness_checks,
    spool_check,
)
from stowaway.metrics import Metrics
from stowaway.runtime import StartupError


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never a proxy for loopback
    return session


@pytest.fixture
def server() -> Iterator[tuple[HealthServer, dict[str, bool]]]:
    """A server whose one check fails while ``state["ok"]`` is False."""
    state = {"ok": True}

    def flaky() -> str:
        if not state["ok"]:
            raise CheckFailed("switched off")
        return "fine"

    readiness = Readiness([("flaky", flaky)], max_age=0)
    srv = HealthServer("127.0.0.1", 0, readiness, Metrics().registry)
    srv.start()
    yield srv, state
    srv.stop()


def test_healthz_readyz_metrics_over_http(server: tuple[HealthServer, dict[str, bool]]) -> None:
    srv, state = server
    base = f"http://127.0.0.1:{srv.port}"
    with http() as s:
        r = s.get(f"{base}/healthz", timeout=5)
        assert (r.status_code, r.text) == (200, "ok\n")
        r = s.get(f"{base}/readyz", timeout=5)
        assert r.status_code == 200
        assert r.json() == {"ready": True, "checks": {"flaky": {"ok": True, "detail": "fine"}}}
        state["ok"] = False
        r = s.get(f"{base}/readyz", timeout=5)
        assert r.status_code == 503
        assert r.json()["reason"] == "flaky: switched off"
        assert r.headers["Content-Type"] == "application/json"
        r = s.get(f"{base}/metrics", timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "stowaway_instances_received_total" in r.text
        r = s.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=5)
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        assert s.get(f"{base}/nothing", timeout=5).status_code == 404


def test_port_in_use_is_a_one_line_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = HealthServer("127.0.0.1", port, Readiness([]), Metrics().registry)
        with pytest.raises(StartupError, match=r"--http-port: cannot listen on 127\.0\.0\.1:\d+"):
            srv.start()


def test_a_hanging_check_fails_within_the_timeout_and_never_piles_up() -> None:
    release = threading.Event()
    calls = []

    def hangs() -> str:
        calls.append(1)
        release.wait(30)
        return "late"

    readiness = Readiness([("db", hangs), ("fast", lambda: "ok")], timeout=0.3, max_age=0)
    started = time.monotonic()
    report = readiness.report()
    assert time.monotonic() - started < 2
    assert not report.ready
    assert report.reason == "db: no answer within 0.3 s"
    assert [c.timed_out for c in report.checks] == [True, False]
    assert report.to_json()["checks"]["fast"] == {"ok": True, "detail": "ok"}
    report = readiness.report()
    assert report.reason == "db: no answer within 0.3 s (still waiting)"
    assert len(calls) == 1  # the hung call is not started again
    release.set()
    time.sleep(0.1)
    assert readiness.report().ready is True
    assert len(calls) == 2


def test_reports_are_reused_briefly_and_stopping_is_not_ready() -> None:
    calls = []
    readiness = Readiness([("count", lambda: str(calls.append(1)))], max_age=60)
    assert readiness.last is None  # nothing is evaluated until asked
    assert readiness.report().ready
    assert readiness.last is not None and readiness.last.ready
    assert readiness.report().ready
    assert len(calls) == 1
    readiness.set_stopping()
    report = readiness.report()
    assert not report.ready and report.reason == "stopping"
    assert readiness.last is not None and not readiness.last.ready
    assert report.to_json()["reason"] == "stopping"


def test_sqlite_database_check_notices_a_file_moved_away(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        check = database_check(engine)
        assert check() == "reachable"
        (tmp_path / "queue.db").rename(tmp_path / "elsewhere.db")
        with pytest.raises(Exception, match="unable to open database file"):
            check()
        assert not (tmp_path / "queue.db").exists()  # the check never creates a database
        (tmp_path / "elsewhere.db").rename(tmp_path / "queue.db")
        assert check() == "reachable"
    finally:
        engine.dispose()


def test_postgres_database_check_reports_a_refused_connection() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    try:
        readiness = Readiness([("database", database_check(engine))], max_age=0)
        report = readiness.report()
    finally:
        engine.dispose()
    assert not report.ready
    assert report.reason is not None and report.reason.startswith("database: OperationalError")


def test_spool_check_fails_when_the_spool_cannot_take_a_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    check = spool_check(spool)
    assert check() == "writable"
    assert list(spool.tmp_dir.iterdir()) == []  # the probe file is removed
    shutil.rmtree(spool.tmp_dir)
    spool.tmp_dir.write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        check()


def test_disk_check_against_the_real_free_space(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert disk_check(tmp_path, 1024)().endswith(" free")
    with pytest.raises(CheckFailed, match=r"free disk .* is below --min-free-disk 1000\.0 TiB"):
        disk_check(tmp_path, 1000 * 1024**4)()
    assert free < 1000 * 1024**4


def test_the_forwarder_has_no_disk_check(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    spool = Spool(tmp_path / "spool")
    try:
        assert [n for n, _ in readiness_checks(engine, spool, min_free_disk=1)] == [
            "database",
            "spool",
            "disk",
        ]
        assert [n for n, _ in readiness_checks(engine, spool, min_free_disk=None)] == [
            "database",
            "spool",
        ]
    finally:
        engine.dispose()


def test_monitor_hands_on_every_report_and_survives_a_failing_action() -> None:
    state = {"ok": True}

    def check() -> str:
        if not state["ok"]:
            raise CheckFailed("down")
        return "up"

    seen: list[ReadinessReport] = []

    def on_report(report: ReadinessReport) -> None:
        seen.append(report)
        if len(seen) == 2:
            raise RuntimeError("action failed")

    monitor = HealthMonitor(Readiness([("x", check)], max_age=0), on_report, interval=0.05)
    assert monitor.check_now().ready
    monitor.start()
    try:
        state["ok"] = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(seen) < 4 or seen[-1].ready):
            time.sleep(0.02)
    finally:
        monitor.stop()
    assert len(seen) >= 4
    assert seen[0].ready and not seen[-1].ready
    assert json.dumps(seen[-1].to_json())
