"""``/healthz``, ``/readyz`` and ``/metrics`` on ``--http-host``:``--http-port``.

* ``/healthz`` answers 200 ``ok`` while the process runs (liveness).
* ``/readyz`` runs the readiness checks (each bounded by ``CHECK_TIMEOUT``) and
  answers 200 with a JSON object of every check, or 503 with the same object and a
  ``reason`` naming what fails. The receiver checks the queue database, the spool
  (a file can be created and removed) and free disk against ``--min-free-disk``;
  the forwarder checks the database and the spool only: it is the one freeing
  the disk, and the destination's state is never a readiness check (a pod is
  Ready only when all its containers are, and a blocked destination must not
  take the receiver out of the load balancer exactly when spooling matters).
* ``/metrics`` is the Prometheus exposition of :class:`stowaway.metrics.Metrics`.

The same port serves the JSON API and the console (:mod:`stowaway.api.app`).

:class:`HealthMonitor` runs the same checks every few seconds whether or not
anyone probes and hands each report to the service, which closes the DICOM
port while free disk is below the threshold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from stowaway.commands.formatting import human_bytes
from stowaway.db.engine import is_sqlite
from stowaway.db.spool import Spool
from stowaway.runtime import StartupError
from stowaway.text import describe_error

if TYPE_CHECKING:
    import uvicorn

    from stowaway.api.context import ApiContext

log = logging.getLogger("stowaway")

#: Longest a readiness check may take; below the probes' timeoutSeconds (3) in k8s/.
CHECK_TIMEOUT = 2.0
#: How long a readiness report is reused (probes and the monitor share it).
REPORT_MAX_AGE = 1.0
#: How often the monitor re-checks readiness.
MONITOR_INTERVAL = 2.0
#: Longest the HTTP server may take to start (import the framework, build the app).
STARTUP_TIMEOUT = 60.0

#: A check returns a short detail when it passes and raises when it fails.
Check = Callable[[], str]


class CheckFailed(Exception):
    """A readiness check's failure; the message is the reason shown in ``/readyz``."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    #: the check did not answer in time (a verdict on the system's load, not on the check)
    timed_out: bool = False


@dataclass(frozen=True)
class ReadinessReport:
    checks: tuple[CheckResult, ...]
    stopping: bool = False

    @property
    def ready(self) -> bool:
        return not self.stopping and all(c.ok for c in self.checks)

    @property
    def reason(self) -> str | None:
        """Why we are not ready, one line; None when ready."""
        if self.stopping:
            return "stopping"
        failing = [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        return "; ".join(failing) or None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ready": self.ready,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }
        if not self.ready:
            out["reason"] = self.reason
        return out


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CheckFailed):
        return str(exc)
    return describe_error(exc)


# -- the checks --------------------------------------------------------------


def database_check(engine: Engine) -> Check:
    """The queue database answers a trivial query.

    SQLite is checked with a fresh connection opened read-write without
    creating the file (``mode=rw``): the pool's open connections would keep
    working on a file that was deleted or moved away, hiding the problem, and
    a pooled connection would begin with ``BEGIN IMMEDIATE`` (a write lock).
    Postgres goes through the engine's pool (``pool_pre_ping`` reconnects).
    """
    if is_sqlite(engine):
        database = engine.url.database or ""
        if database in ("", ":memory:"):
            return lambda: "in-memory"
        uri = Path(database).resolve().as_uri() + "?mode=rw"

        def check_sqlite() -> str:
            conn = sqlite3.connect(uri, uri=True, timeout=CHECK_TIMEOUT)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
            return "reachable"

        return check_sqlite

    def check_pool() -> str:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1").scalar()
        return "reachable"

    return check_pool


def spool_check(spool: Spool) -> Check:
    """A file can be created, written and removed in the spool's ``tmp`` directory."""

    def check() -> str:
        probe = spool.tmp_dir / f".readyz-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
        finally:
            # Also when the write fails (a full disk): never leave the probe behind.
            with contextlib.suppress(OSError):
                os.unlink(probe)
        return "writable"

    return check


def disk_check(path: Path, minimum: int) -> Check:
    """Free space on the spool's file system is at least ``minimum`` bytes."""

    def check() -> str:
        free = shutil.disk_usage(path).free
        if free < minimum:
            raise CheckFailed(
                f"free disk {human_bytes(free)} is below --min-free-disk {human_bytes(minimum)}"
            )
        return f"{human_bytes(free)} free"

    return check


# -- running them -------------------------------------------------------------


class _BoundedCheck:
    """Runs one check in a daemon thread and waits for it at most until a deadline.

    A check that hangs (a database host that drops packets, a stuck NFS mount)
    is reported as failing, and is not started again until the hung call returns,
    so threads never pile up.
    """

    def __init__(self, name: str, check: Check) -> None:
        self.name = name
        self.check = check
        self._thread: threading.Thread | None = None
        self._outcome: tuple[bool, str] | None = None

    def start(self) -> bool:
        """Start a run; False if the previous one is still hanging."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._outcome = None
        self._thread = threading.Thread(target=self._run, name=f"readyz-{self.name}", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        try:
            self._outcome = (True, self.check())
        except Exception as exc:
            self._outcome = (False, _one_line(exc))

    def result(self, started: bool, deadline: float, timeout: float) -> CheckResult:
        if not started:
            return CheckResult(
                self.name, False, f"no answer within {timeout:g} s (still waiting)", timed_out=True
            )
        assert self._thread is not None
        self._thread.join(max(0.0, deadline - time.monotonic()))
        outcome = self._outcome
        if self._thread.is_alive() or outcome is None:
            return CheckResult(self.name, False, f"no answer within {timeout:g} s", timed_out=True)
        return CheckResult(self.name, outcome[0], outcome[1])


class Readiness:
    """Evaluates the readiness checks in parallel, each bounded by ``timeout``.

    A report is reused for ``max_age`` seconds, so a burst of probes costs one
    evaluation.
    """

    def __init__(
        self,
        checks: Sequence[tuple[str, Check]],
        *,
        timeout: float = CHECK_TIMEOUT,
        max_age: float = REPORT_MAX_AGE,
    ) -> None:
        self._checks = [_BoundedCheck(name, check) for name, check in checks]
        self.timeout = timeout
        self.max_age = max_age
        self._lock = threading.Lock()
        self._last: ReadinessReport | None = None
        self._last_at = float("-inf")
        self._stopping = False
        self._logged: tuple[bool, str | None] | None = None

    @property
    def last(self) -> ReadinessReport | None:
        """The latest report, without evaluating anything (None before the first)."""
        last = self._last
        return None if last is None else ReadinessReport(last.checks, self._stopping)

    def set_stopping(self) -> None:
        """From now on report not ready (SIGTERM: let the load balancer drain us)."""
        self._stopping = True

    def report(self) -> ReadinessReport:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < self.max_age:
                return ReadinessReport(self._last.checks, self._stopping)
            deadline = now + self.timeout
            started = [(c, c.start()) for c in self._checks]
            results = tuple(c.result(s, deadline, self.timeout) for c, s in started)
            self._last = ReadinessReport(results, self._stopping)
            self._last_at = time.monotonic()
            self._log_change(self._last)
            return self._last

    def _log_change(self, report: ReadinessReport) -> None:
        """``ready`` / ``not_ready`` (with the reason) whenever an evaluation changes the
        verdict, whoever asked (a probe between two rounds of the monitor too)."""
        if (report.ready, report.reason) == self._logged:
            return
        self._logged = (report.ready, report.reason)
        if report.ready:
            log.info("ready", extra={"checks": _details(report)})
        else:
            log.warning("not_ready", extra={"reason": report.reason})


def readiness_checks(
    engine: Engine, spool: Spool, *, min_free_disk: int | None
) -> list[tuple[str, Check]]:
    """The receiver's checks; ``min_free_disk=None`` leaves out the disk (the forwarder)."""
    checks = [("database", database_check(engine)), ("spool", spool_check(spool))]
    if min_free_disk is not None:
        checks.append(("disk", disk_check(spool.root, min_free_disk)))
    return checks


class HealthMonitor:
    """Re-evaluates readiness every ``interval`` seconds and hands each report on.

    ``on_report`` gets every report, not only changes, so that an action that
    failed (listening again on the DICOM port) is retried on the next round;
    it must be idempotent. It runs in one thread at a time. Changes are logged by
    :class:`Readiness` when it evaluates
    (``ready`` / ``not_ready`` with the reason).
    """

    def __init__(
        self,
        readiness: Readiness,
        on_report: Callable[[ReadinessReport], None],
        *,
        interval: float = MONITOR_INTERVAL,
    ) -> None:
        self.readiness = readiness
        self.on_report = on_report
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> ReadinessReport:
        """Evaluate once in the caller's thread (at start-up, before ``start()``)."""
        report = self.readiness.report()  # which logs a change of verdict
        try:
            self.on_report(report)
        except Exception:
            log.exception("readiness_action_failed")
        return report

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="health-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A round is bounded (checks by their timeout, on_report by the caller):
            # wait for it, so nothing it does overlaps what the caller does next.
            self._thread.join(self.readiness.timeout + 10.0)


def _details(report: ReadinessReport) -> str:
    return ", ".join(f"{c.name}={c.detail}" for c in report.checks)


# -- the HTTP server ------------------------------------------------------------


class HealthServer:
    """The HTTP port: the probes, and with an API context the API and the console
    (:mod:`stowaway.api.app`), served by uvicorn in a daemon thread.

    :meth:`start` binds the port itself (a port in use is a one-line start-up error) and
    returns once the server answers.
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        registry: CollectorRegistry,
        context: ApiContext | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.readiness = readiness
        self.registry = registry
        self.context = context
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._port = 0

    @property
    def port(self) -> int:
        assert self._socket is not None
        return self._port

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"--http-port: cannot listen on {self.host}:{self.requested_port}: "
                f"{exc.strerror or exc} (another process on the port? --http-port 0 disables)"
            ) from None
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self._thread.is_alive() and not (self._server is not None and self._server.started):
            if time.monotonic() > deadline:
                raise StartupError(
                    f"--http-port: the HTTP server did not start within {STARTUP_TIMEOUT:g} s"
                )
            time.sleep(0.01)
        if not self._thread.is_alive():
            raise StartupError("--http-port: the HTTP server failed to start (see the log)")
        log.info("http_listening", extra={"host": self.host, "port": self.port})

    def _serve(self, sock: socket.socket) -> None:
        try:
            import uvicorn

            from stowaway.api.app import build_app
            from stowaway.api.protocol import DeadlineH11Protocol

            logging.getLogger("uvicorn").setLevel(logging.WARNING)
            config = uvicorn.Config(
                build_app(self.readiness, self.registry, self.context),
                log_config=None,
                access_log=False,  # probes hit these endpoints every few seconds
                lifespan="off",
                # A client that connects and sends nothing must not hold a connection long.
                http=DeadlineH11Protocol,
                loop="asyncio",
                server_header=False,
                timeout_keep_alive=10,
                timeout_graceful_shutdown=2,
            )
            server = uvicorn.Server(config)
            with self._lock:
                if self._stopped:
                    return
                self._server = server
            server.run(sockets=[sock])
        except Exception:
            log.exception("http_server_failed")

    def stop(self) -> None:
        with self._lock:
            if self._stopped or self._socket is None:
                return
            self._stopped = True
            server = self._server
        if server is not None:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._socket.close()
