"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from receiver.store import StoreHandler

log = logging.getLogger("stowaway.receiver")

# Stream every received dataset straight to a file instead of memory.
_config.STORE_RECV_CHUNKED_DATASET = True
# A gateway stores whatever storage SOP class a modality sends, private ones
# included, in whatever transfer syntax the sender proposes first: the bytes
# are kept untouched, never decoded.
_config.UNRESTRICTED_STORAGE_SERVICE = True


@dataclass(frozen=True)
class ReceiverConfig:
    aet: str = "IMPORTADAPTER"
    host: str = "0.0.0.0"
    port: int = 2575
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 20
    idle_timeout: float = 60.0
    max_pdu: int = 262144


@dataclass
class AssociationCounters:
    """Live counts, read by metrics."""

    open: int = 0
    accepted: int = 0
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Receiver:
    """Owns the AE and its listening server.

    ``start()`` returns once the port is bound; ``stop(grace)`` stops accepting
    new associations at once and lets the ones in progress finish for up to
    ``grace`` seconds before aborting them.
    """

    def __init__(
        self,
        config: ReceiverConfig,
        handler: StoreHandler,
        incoming_dir: str,
        on_association: Callable[[str], None] = lambda _kind: None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.incoming_dir = incoming_dir
        self.on_association = on_association
        self.counters = AssociationCounters()
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.aet)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        ae.network_timeout = self.config.idle_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = self.config.idle_timeout
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        # pynetdicom's chunked receive writes temporary files in the default
        # temp directory: put them on the spool's file system (the container's
        # root file system is read-only, and a 1 GiB instance needs the volume).
        tempfile.tempdir = self.incoming_dir
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handler),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "receiver_listening",
            extra={"aet": self.config.aet, "host": self.config.host, "port": self.port},
        )

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, grace: float) -> None:
        """Stop accepting, wait for associations in progress, then abort the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            # Connections that never negotiated (port probes, half-open peers)
            # have nothing in progress: only established associations get the grace.
            if not any(a.is_established for a in server.active_associations):
                break
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        aborted = sum(1 for a in remaining if a.is_established)
        log.info("receiver_stopped", extra={"aborted_associations": aborted})

    # -- event handlers: logging and counters only -------------------------

    def _on_conn_open(self, event: Event) -> None:
        # Answer each C-STORE at once instead of waiting on Nagle's algorithm.
        sock = event.assoc.dul.socket
        raw = getattr(sock, "socket", None) if sock is not None else None
        if isinstance(raw, socket.socket):
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.counters.lock:
            self.counters.open += 1
        self.on_association("open")

    def _on_conn_close(self, event: Event) -> None:
        with self.counters.lock:
            self.counters.open -= 1
        self.on_association("close")

    def _on_accepted(self, event: Event) -> None:
        with self.counters.lock:
            self.counters.accepted += 1
        requestor = event.assoc.requestor
        log.info(
            "association_accepted",
            extra={"calling_aet": str(requestor.ae_title).strip(), "peer": requestor.address},
        )
        self.on_association("accepted")

    def _on_rejected(self, event: Event) -> None:
        with self.counters.lock:
            self.counters.rejected += 1
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        log.warning(
            "association_rejected",
            extra={
                "calling_aet": str(getattr(primitive, "calling_ae_title", "") or "").strip(),
                "called_aet": str(getattr(primitive, "called_ae_title", "") or "").strip(),
                "peer": requestor.address,
                "reason": _reject_reason(event),
            },
        )
        self.on_association("rejected")

    def _on_aborted(self, event: Event) -> None:
        log.warning("association_aborted", extra={"peer": event.assoc.requestor.address})


def _reject_reason(event: Event) -> str:
    assoc = event.assoc
    primitive_rq = assoc.requestor.primitive
    called = str(getattr(primitive_rq, "called_ae_title", "") or "").strip()
    calling = str(getattr(primitive_rq, "calling_ae_title", "") or "").strip()
    if assoc.ae.require_called_aet and called != str(assoc.ae.ae_title).strip():
        return "called AE title not recognised"
    allowed = [a.strip() for a in assoc.ae.require_calling_aet]
    if allowed and calling not in allowed:
        return "calling AE title not allowed"
    return "too many associations"
