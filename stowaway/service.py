"""Long-running subcommands: ``serve``, ``receive`` and ``forward``."""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from types import FrameType

from receiver.scp import Receiver, ReceiverConfig
from receiver.store import StoreHandler
from stowaway.runtime import State, open_state
from stowaway.settings import Settings, describe

log = logging.getLogger("stowaway")


class StopSignal:
    """Turns SIGTERM/SIGINT into an event the main thread waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", extra={"signal": signal.Signals(signum).name})
        self.event.set()


def clear_incoming(state: State) -> None:
    """Remove partial receipts left by a crash: their senders were never acknowledged."""
    for directory in (state.spool.incoming_dir, state.spool.tmp_dir):
        for leftover in directory.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


def run(settings: Settings, *, receive: bool, forward: bool) -> int:
    """Run the receiver and/or the forwarder until SIGTERM; exit code 0 on a clean stop."""
    stop = StopSignal()
    stop.install()
    state = open_state(settings)
    log.info("starting", extra={"receive": receive, "forward": forward, **describe(settings)})
    receiver: Receiver | None = None
    forwarder = None
    try:
        if receive:
            clear_incoming(state)
            receiver = build_receiver(settings, state)
            receiver.start()
        if forward:
            from stowaway.forwarding import build_forwarder

            forwarder = build_forwarder(settings, state)
            forwarder.start()
        stop.event.wait()
    finally:
        if receiver is not None:
            receiver.stop(settings.grace_period)
        if forwarder is not None:
            forwarder.stop(settings.grace_period)
        state.close()
    log.info("stopped")
    return 0


def build_receiver(settings: Settings, state: State) -> Receiver:
    def refusal() -> str | None:
        free = shutil.disk_usage(state.spool.root).free
        if free < settings.min_free_disk:
            return "Out of disk space on the spool"
        return None

    handler = StoreHandler(state.spool, state.queue, node_id=settings.node_id, is_accepting=refusal)
    config = ReceiverConfig(
        aet=settings.aet,
        host=settings.host,
        port=settings.port,
        allowed_calling_aets=settings.allowed_calling_aets,
        max_associations=settings.max_associations,
        idle_timeout=settings.idle_timeout,
        max_pdu=settings.max_pdu,
    )
    return Receiver(config, handler, str(state.spool.incoming_dir))
