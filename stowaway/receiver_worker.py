"""One receiver process of ``--processes N``: a full pynetdicom AE serving the
connections the main process accepts and hands over (:mod:`stowaway.receiver_pool`).

Run as ``python -m stowaway.receiver_worker CONTROL_FD PARENT_PID`` by the pool
only. It has its own store handler, group commit and database pool, writing
the same queue and spool as its siblings; it never listens on a port. It dies
with the main process (``PR_SET_PDEATHSIG``, and at the end of its control
channel), so that no receiver outlives the process that owns the queue's
start-up reconcile: a C-STORE it had not answered is simply not acknowledged,
as when the whole service is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import replace

from stowaway import handoff, stop_signal
from stowaway.logs import configure_logging
from stowaway.settings import Settings

log = logging.getLogger("stowaway")

#: prctl(2) option: the signal this process gets when its parent thread ends.
_PR_SET_PDEATHSIG = 1
#: How often the process reports its open connections even when nothing changes.
LOAD_INTERVAL = 0.5


def _die_with(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (or it has already)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(70)  # the parent died before prctl took


class _Filter(logging.Filter):
    """Names the receiver process in each log line."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.receiver_process = self.index
        return True


class _Channel:
    """The worker's end of the control channel; sends never raise."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, *message: object) -> None:
        try:
            handoff.send(self.sock, message)
        except OSError:
            os._exit(70)  # the main process is gone: behave as if killed with it


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with(parent)
    stop_signal.install(deferred=True)
    control = socket.socket(fileno=fd)
    first = handoff.receive(control)
    if first is None or first[0][0] != "hello":
        return 70
    _kind, settings, index, plain_port, tls_port, share = first[0]
    assert isinstance(settings, Settings)
    configure_logging(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Filter(index))
    os.umask(0o077)
    return serve(control, settings, index, plain_port, tls_port, share)


def serve(
    control: socket.socket,
    settings: Settings,
    index: int,
    plain_port: int | None,
    tls_port: int | None,
    share: int,
) -> int:
    from stowaway.commitment import build_storage_commitment
    from stowaway.receiver.store import StoreOutcome
    from stowaway.runtime import open_state
    from stowaway.service import build_receiver

    channel = _Channel(control)
    state = open_state(settings, migrate_embedded=False)
    own = replace(
        settings,
        max_associations=share,
        port=plain_port if plain_port is not None else settings.port,
        tls_port=tls_port or 0,
    )

    def on_outcome(outcome: StoreOutcome) -> None:
        channel.send("store", outcome.status, outcome.seconds, outcome.size_bytes)

    adopted = 0
    receiver = None

    def report_load() -> None:
        if receiver is not None:
            channel.send("load", adopted, receiver.open_connections())

    def on_association(kind: str) -> None:
        channel.send("association", kind)
        if kind == "close":
            report_load()

    # Storage commitment: this process answers the N-ACTIONs it receives, and its reporter
    # takes its turn at the shared queue's due reports (leases make each one sent once).
    commitment = build_storage_commitment(
        own,
        state,
        on_request=lambda recorded: channel.send("commitment_request", recorded),
        on_report=lambda outcome: channel.send("commitment_report", outcome),
    )
    receiver = build_receiver(
        own,
        state,
        on_outcome=on_outcome,
        on_association=on_association,
        services=commitment.services,
    )
    receiver.start(handed=True)
    commitment.reporter.start()
    log.info("receiver_process_ready", extra={"pid": os.getpid(), "processes_share": share})
    channel.send("ready", os.getpid())

    def read_control() -> None:
        nonlocal adopted
        control.settimeout(LOAD_INTERVAL)
        while True:
            try:
                got = handoff.receive(control)
            except TimeoutError:
                report_load()
                continue
            except OSError:
                got = None
            if got is None:
                os._exit(70)  # the main process is gone
            message, fds = got
            if message[0] == "connection" and fds:
                _kind, address, tls = message
                sock = socket.socket(fileno=fds[0])
                sock.setblocking(True)
                for extra in fds[1:]:
                    os.close(extra)
                adopted += 1
                try:
                    receiver.adopt(sock, tuple(address), tls=bool(tls))
                except Exception:
                    log.exception("connection_adopt_failed")
                    sock.close()
                report_load()
            elif message[0] == "stop":
                stop_signal.STOP.set()
            else:
                for extra in fds:
                    os.close(extra)

    threading.Thread(target=read_control, name="receiver-control", daemon=True).start()
    stop_signal.wait()
    receiver.stop(settings.grace_period)
    commitment.reporter.stop(settings.grace_period)
    state.close()
    log.info("receiver_process_stopped", extra={"pid": os.getpid()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
