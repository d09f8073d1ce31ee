"""``--processes N``: one accepting process, N receiver processes.

One Python process tops out near one core: pynetdicom decodes every PDU in
Python, under the GIL. So with ``--processes N`` (default: the CPUs this
container may use) the main process listens on the DICOM ports and hands each
accepted connection, as a file descriptor over a Unix socket
(:mod:`stowaway.handoff`), to one of N receiver processes
(:mod:`stowaway.receiver_worker`), each a full pynetdicom AE with its own
store handler and group commit, all writing the one queue and spool. The main
process keeps the HTTP side, the forwarders and the start-up reconcile.

Why one acceptor rather than ``SO_REUSEPORT``: the kernel spreads
``SO_REUSEPORT`` connections by a hash of their addresses, not by load, and
associations are few and long: four associations land 2+2 on two processes
only three times in eight. Here each connection goes to the process with the
fewest open connections. The acceptor also keeps one allow-list check by
address and one connection limit for the whole service, pausing on low disk
is closing one socket, and a receiver process that dies loses only the
connections it was serving (with ``SO_REUSEPORT`` those waiting in its accept
queue would be reset too).

A receiver process that dies is started again (after 0.5 s, doubling up to
10 s while it keeps dying young). Its connections die with it, so their
senders see the association aborted and send again whatever was not
acknowledged: a C-STORE is answered only after its row is committed, in that
process, so nothing acknowledged is lost and nothing is half-acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from stowaway import handoff, stop_signal
from stowaway.db.commitments import Recorded
from stowaway.receiver.commitment_reporter import ReportOutcome
from stowaway.receiver.peers import PeerPolicy
from stowaway.receiver.store import StoreOutcome
from stowaway.runtime import StartupError
from stowaway.settings import Settings

log = logging.getLogger("stowaway.receiver")

#: How long a receiver process may take to start before start-up fails.
START_TIMEOUT = 60.0
#: Restart delays of a receiver process that keeps dying within ``YOUNG`` seconds.
RESTART_FIRST, RESTART_MAX, YOUNG = 0.5, 10.0, 10.0


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, else v1 CFS quota), None: no quota."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu/cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def receiver_processes(settings: Settings) -> int:
    """How many receiver processes to run (1: receive in the main process).

    Never more than ``--max-associations``: each process takes a share of it.
    """
    wanted = settings.processes or available_cpus()
    return max(1, min(wanted, settings.max_associations))


@dataclass
class _Worker:
    """One receiver process, as the accepting process sees it."""

    index: int
    proc: subprocess.Popen[bytes]
    control: socket.socket
    started_at: float
    ready: threading.Event = field(default_factory=threading.Event)
    #: held while its messages are applied (by its reader thread or a scrape)
    lock: threading.Lock = field(default_factory=threading.Lock)
    handed: int = 0
    adopted: int = 0
    open_reported: int = 0
    #: EVT_CONN_OPEN minus EVT_CONN_CLOSE seen from it (for the metric)
    connections_open: int = 0
    ended: bool = False

    @property
    def load(self) -> int:
        """Its open connections: as it last reported, plus those handed over since."""
        return self.open_reported + self.handed - self.adopted


class _Listener:
    """One listening socket of the accepting process and its accept thread."""

    def __init__(self, host: str, port: int, tls: bool) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self.sock = sock

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            sock.close()
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)


class ReceiverPool:
    """The accepting process's side of ``--processes N`` (see the module docstring).

    Offers what the service uses of a :class:`~stowaway.receiver.scp.Receiver`:
    ``start``, ``stop(grace)``, ``pause``/``resume``/``paused`` and ``port``.
    """

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        on_outcome: Callable[[StoreOutcome], None] = lambda _o: None,
        on_association: Callable[[str], None] = lambda _k: None,
        on_restart: Callable[[], None] = lambda: None,
        on_commitment_request: Callable[[Recorded], None] = lambda _r: None,
        on_commitment_report: Callable[[ReportOutcome], None] = lambda _o: None,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.on_outcome = on_outcome
        self.on_association = on_association
        self.on_restart = on_restart
        # Storage commitment runs in each receiver process (its N-ACTIONs arrive there);
        # its events come back here for the metrics, like the stores'.
        self.on_commitment_request = on_commitment_request
        self.on_commitment_report = on_commitment_report
        self.policy = PeerPolicy.from_settings(
            settings.allowed_peers, settings.allowed_calling_aets
        )
        #: each process's share of --max-associations; the acceptor bounds connections
        self.share = max(1, math.ceil(settings.max_associations / processes))
        self.max_connections = 2 * settings.max_associations
        self._listeners: list[_Listener] = []
        if not settings.tls_only:
            self._listeners.append(_Listener(settings.host, settings.port, tls=False))
        if settings.tls_port:
            self._listeners.append(_Listener(settings.host, settings.tls_port, tls=True))
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()  # the workers' table and their counts
        self._turn = 0
        self._stopping = False
        self._pause_reason: str | None = None
        self.restarts = 0
        self._young_exits: dict[int, int] = {}
        # Every receiver process is started by this one thread, which lives until
        # they have all ended: PR_SET_PDEATHSIG fires when the starting thread ends.
        self._requests: SimpleQueue[int | None] = SimpleQueue()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-supervisor")
        #: notified when a receiver process becomes ready or ends (under ``_lock``)
        self._changed = threading.Condition(self._lock)

    # -- what the service uses -------------------------------------------------

    @property
    def port(self) -> int:
        return self._listeners[0].port

    @property
    def paused(self) -> bool:
        return self._pause_reason is not None

    def launch(self) -> None:
        """Bind the ports and start the receiver processes (each takes a couple of
        seconds to import); call early, so they start while the service does."""
        if self._supervisor.is_alive():
            return
        try:
            for listener in self._listeners:
                listener.bind()
        except OSError as exc:
            self._close_listeners()
            raise StartupError(f"--port/--tls-port: cannot listen: {exc.strerror or exc}") from None
        self._supervisor.start()
        for index in range(self.processes):
            self._requests.put(index)

    def start(self) -> None:
        """Listen. A connection that comes before any receiver process is ready waits
        in the acceptor (up to ``START_TIMEOUT``), as it would in a busy backlog."""
        self.launch()
        for listener in self._listeners:
            self._listen(listener)

    def stop(self, grace: float) -> None:
        """Stop accepting, let each process drain for ``grace`` s, then kill what is left."""
        self._stopping = True
        self._close_listeners()
        if self._supervisor.is_alive():
            self._requests.put(None)
            self._supervisor.join(grace + 20)
        log.info("receiver_processes_stopped", extra={"processes": self.processes})

    def pause(self, reason: str) -> None:
        """Close the DICOM ports (see ``Receiver.pause``); the processes keep their work."""
        if self.paused or self._stopping:
            return
        self._pause_reason = reason
        self._close_listeners()
        log.warning(
            "receiver_paused",
            extra={"reason": reason, "ports": [ln.port for ln in self._listeners]},
        )

    def resume(self) -> bool:
        if not self.paused or self._stopping:
            return True
        for listener in self._listeners:
            if listener.sock is not None:
                continue
            try:
                listener.bind()
            except OSError as exc:
                log.error(
                    "receiver_resume_failed", extra={"port": listener.port, "error": str(exc)}
                )
                return False
            self._listen(listener)
        self._pause_reason = None
        log.info("receiver_resumed", extra={"ports": [ln.port for ln in self._listeners]})
        return True

    def ready_processes(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers.values() if w.ready.is_set() and not w.ended)

    def readiness_check(self) -> str:
        """``/readyz``: at least one receiver process serves (``ready/N``)."""
        from stowaway.health import CheckFailed

        ready = self.ready_processes()
        detail = f"{ready}/{self.processes} receiver processes"
        if ready == 0:
            raise CheckFailed(f"{detail} ready (starting)")
        return detail

    def sync(self) -> None:
        """Apply every message the processes have sent so far (before a scrape)."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            with worker.lock:
                self._drain(worker)

    def synced_registry(self, registry: CollectorRegistry) -> CollectorRegistry:
        """``registry`` as ``/metrics`` should read it: after :meth:`sync`."""
        return _SyncedRegistry(registry, self.sync)

    # -- listening ------------------------------------------------------------

    def _listen(self, listener: _Listener) -> None:
        assert listener.sock is not None
        listener.sock.listen(128)
        listener.thread = threading.Thread(
            target=self._accept_loop,
            args=(listener, listener.sock),
            name=f"acceptor@{listener.port}",
            daemon=True,
        )
        listener.thread.start()
        log.info(
            "receiver_listening",
            extra={
                "aet": self.settings.aet,
                "host": listener.host,
                "port": listener.port,
                "tls": listener.tls,
                "client_certificates": listener.tls and self.settings.tls_ca is not None,
                "allow_list": "off" if self.policy.open else "on",
                "processes": self.processes,
            },
        )

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _accept_loop(self, listener: _Listener, sock: socket.socket) -> None:
        while True:
            try:
                conn, address = sock.accept()
            except OSError:
                return  # closed: stop or pause
            try:
                self._dispatch(conn, address, listener)
            except Exception:
                log.exception("connection_dispatch_failed")
            finally:
                conn.close()  # the receiver process holds its own copy

    def _live(self) -> list[_Worker]:
        """The receiver processes connections can go to (``_lock`` held)."""
        return [w for w in self._workers.values() if w.ready.is_set() and not w.ended]

    def _dispatch(self, conn: socket.socket, address: tuple[str, int], listener: _Listener) -> None:
        peer = str(address[0])
        reason: str | None = None
        worker: _Worker | None = None
        if not self.policy.address_admitted(peer):
            reason = "source address not in the allow-list"
        else:
            with self._lock:
                live = self._live()
                deadline = time.monotonic() + START_TIMEOUT
                while not live and not self._stopping and time.monotonic() < deadline:
                    self._changed.wait(0.5)  # starting, or all restarting at once
                    live = self._live()
                if sum(w.load for w in self._workers.values() if not w.ended) >= (
                    self.max_connections
                ):
                    reason = "too many connections"
                elif not live:
                    reason = "no receiver process ready"
                else:
                    # The least loaded; among equals, take turns.
                    self._turn += 1
                    worker = min(
                        live, key=lambda w: (w.load, (w.index - self._turn) % self.processes)
                    )
                    worker.handed += 1
        if worker is None:
            log.warning(
                "connection_refused",
                extra={
                    "peer": peer,
                    "port": listener.port,
                    "transport": "tls" if listener.tls else "plain",
                    "reason": reason,
                },
            )
            return
        try:
            handoff.send(
                worker.control,
                ("connection", (peer, int(address[1])), listener.tls),
                (conn.fileno(),),
            )
        except OSError:
            with self._lock:
                worker.handed -= 1
            # It died meanwhile: closing the connection makes the sender try again.

    # -- the receiver processes ------------------------------------------------

    def _supervise(self) -> None:
        while True:
            index = self._requests.get()
            if index is None:
                break
            if self._stopping:
                continue
            try:
                self._spawn(index)
            except Exception:
                log.exception("receiver_process_start_failed", extra={"index": index})
                self._restart_later(index, RESTART_MAX)
        self._stop_workers()

    def _listening(self) -> bool:
        return any(ln.thread is not None for ln in self._listeners)

    def _spawn(self, index: int) -> None:
        ours, theirs = handoff.channel()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stowaway.receiver_worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, proc, ours, time.monotonic())
        handoff.send(
            ours,
            (
                "hello",
                self.settings,
                index,
                None if self.settings.tls_only else self._listeners[0].port,
                next((ln.port for ln in self._listeners if ln.tls), None),
                self.share,
            ),
        )
        with self._lock:
            self._workers[index] = worker
        threading.Thread(
            target=self._read, args=(worker,), name=f"receiver-{index}", daemon=True
        ).start()

    def _read(self, worker: _Worker) -> None:
        """Apply one process's messages until it ends; then restart it."""
        while not worker.ended:
            with contextlib.suppress(OSError, ValueError):
                select.select([worker.control], [], [], 1.0)
            with worker.lock:
                self._drain(worker)
        self._ended(worker)

    def _drain(self, worker: _Worker) -> None:
        """Apply every message waiting from ``worker`` (its lock held)."""
        while not worker.ended:
            try:
                got = handoff.receive(worker.control, wait=False)
            except BlockingIOError:
                return
            except (OSError, ValueError, EOFError):
                got = None
            if got is None:
                worker.ended = True
                return
            message, fds = got
            for fd in fds:
                os.close(fd)
            self._apply(worker, message)

    def _apply(self, worker: _Worker, message: handoff.Message) -> None:
        kind = message[0]
        if kind == "store":
            _kind, status, seconds, size = message
            self.on_outcome(StoreOutcome(int(status), float(seconds), int(size)))
        elif kind == "association":
            association = str(message[1])
            if association == "open":
                worker.connections_open += 1
            elif association == "close":
                worker.connections_open -= 1
            self.on_association(association)
        elif kind == "commitment_request" and isinstance(message[1], Recorded):
            self.on_commitment_request(message[1])
        elif kind == "commitment_report" and isinstance(message[1], ReportOutcome):
            self.on_commitment_report(message[1])
        elif kind == "load":
            with self._lock:
                worker.adopted, worker.open_reported = int(message[1]), int(message[2])
        elif kind == "ready":
            with self._lock:
                worker.ready.set()
                self._changed.notify_all()

    def _ended(self, worker: _Worker) -> None:
        """The process closed its channel: it exited (or is about to)."""
        try:
            code = worker.proc.wait(10)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        worker.control.close()
        with self._lock:
            self._changed.notify_all()
        # Its connections went with it.
        for _ in range(max(0, worker.connections_open)):
            self.on_association("close")
        worker.connections_open = 0
        if self._stopping or stop_signal.STOP.is_set():
            return  # a SIGTERM to the process group reached it first: we stop too
        lived = time.monotonic() - worker.started_at
        log.error(
            "receiver_process_exited",
            extra={
                "index": worker.index,
                "pid": worker.proc.pid,
                "exit_code": code,
                "signal": -code if code < 0 else None,
                "seconds": round(lived, 1),
                "had_started": worker.ready.is_set(),
            },
        )
        # Dying young again and again: wait longer each time.
        young = 0 if lived >= YOUNG else self._young_exits.get(worker.index, 0) + 1
        self._young_exits[worker.index] = young
        delay = min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, young - 1))
        self.restarts += 1
        self.on_restart()
        self._restart_later(worker.index, delay)

    def _restart_later(self, index: int, delay: float) -> None:
        timer = threading.Timer(delay, self._requests.put, args=(index,))
        timer.daemon = True
        timer.start()

    def _stop_workers(self) -> None:
        """(In the supervisor thread.) Ask every process to stop, wait, kill the rest."""
        with self._lock:
            workers = [w for w in self._workers.values() if not w.ended]
        for worker in workers:
            with contextlib.suppress(OSError):
                handoff.send(worker.control, ("stop",))
        deadline = time.monotonic() + self.settings.grace_period + 10
        for worker in workers:
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("receiver_process_killed", extra={"pid": worker.proc.pid})
                worker.proc.kill()
                worker.proc.wait()


class _SyncedRegistry(CollectorRegistry):
    """A registry read only after the receiver processes' messages are applied."""

    def __init__(self, inner: CollectorRegistry, sync: Callable[[], None]) -> None:
        super().__init__()
        self.inner = inner
        self._sync = sync

    def collect(self) -> Iterator[Metric]:
        self._sync()
        yield from self.inner.collect()
