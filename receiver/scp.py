"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

One AE serves up to two listeners: plain DIMSE on ``port`` and DICOM over TLS on
``tls_port``. Both share the association limit, the idle timeout and the peer
allow-list (:mod:`receiver.peers`), enforced at three points:

* when a TCP connection is accepted (``_GuardedServer.verify_request``): a source
  address no allow-list entry covers, or one connection too many, is closed at
  once, before any TLS handshake or association thread;
* when the A-ASSOCIATE-RQ arrives (EVT_REQUESTED): a (calling AE, address) pair
  no entry admits gets A-ASSOCIATE-RJ "calling AE title not recognised".
  ``AE.require_calling_aet`` cannot do this, being one list for every address.
  EVT_REQUESTED is a notification event, but pynetdicom checks ``is_rejected``
  after it and skips its own negotiation (``Association.run_reactor``: "User used
  EVT_REQUESTED to send an A-ABORT or A-ASSOCIATE-RJ"), so a handler that sends the
  reject is the supported way to refuse for a reason of one's own;
* at every C-STORE, the pair is checked again (0x0124 "not authorized"), so a
  future pynetdicom that went on negotiating after that reject fails closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from stowaway.receiver import pynetdicom_hooks, socket_reader
from stowaway.receiver.incoming import InstanceLimits
from stowaway.receiver.peers import PeerPolicy
from stowaway.receiver.store import StoreHandler
from stowaway.receiver.tls import server_context
from stowaway.text import first_line

log = logging.getLogger("stowaway.receiver")


#: C-STORE status "Refused: Not authorized" (PS3.7 Annex C).
NOT_AUTHORIZED: Final = 0x0124

#: A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised.
_REJECT_CALLING_AET: Final = (0x01, 0x01, 0x03)
#: result rejected-permanent, source service-user, reason called AE title not recognised
_REJECT_CALLED_AET: Final = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class ReceiverConfig:
    """What the receiver listens on and whom it admits.

    ``port`` is the plain DIMSE port (``None``: no plain listener, TLS only);
    ``tls_port`` the DICOM-over-TLS port (``None``: no TLS listener) served with
    ``tls_cert``/``tls_key``, requiring client certificates from ``tls_ca`` when
    given. Port 0 binds a free port (tests). ``allowed_peers`` are ``AE@CIDR``
    entries, see :mod:`receiver.peers`.
    """

    aet: str = "IMPORTADAPTER"
    #: further called AE titles answered (``--aet A,B``); routing rules can test which
    aet_aliases: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int | None = 2575
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 20
    idle_timeout: float = 60.0
    max_pdu: int = 262144
    #: dataset bytes one C-STORE may send, and the free space writing must leave
    max_instance_size: int = 4 * 1024**3
    min_free_disk: int = 0
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allowed_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtraServices:
    """Services besides C-ECHO and C-STORE: the SOP classes the AE also supports and the
    event handlers that serve them (query/retrieve, :mod:`receiver.query_retrieve`)."""

    contexts: tuple[str, ...] = ()
    #: SOP classes offered with SCP/SCU role selection: a requester's proposed roles
    #: are accepted as proposed (storage commitment, :mod:`receiver.storage_commitment`)
    role_contexts: tuple[str, ...] = ()
    handlers: tuple[tuple[Any, Callable[..., Any]], ...] = ()

    def __add__(self, other: ExtraServices) -> ExtraServices:
        return ExtraServices(
            contexts=self.contexts + other.contexts,
            role_contexts=self.role_contexts + other.role_contexts,
            handlers=self.handlers + other.handlers,
        )


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
        services: ExtraServices = ExtraServices(),
    ) -> None:
        self.config = config
        self.services = services
        self.handler = handler
        self.incoming_dir = incoming_dir
        self.on_association = on_association
        self.counters = AssociationCounters()
        self.policy = PeerPolicy.from_settings(config.allowed_peers, config.allowed_calling_aets)
        # One gate for both listeners: the association threads are the AE's.
        self._gate = _Gate(self.policy, max_connections=2 * config.max_associations)
        if config.port is None and config.tls_port is None:
            raise ValueError("the receiver needs a plain port, a TLS port or both")
        # The TLS context is built (and its files checked) before anything listens.
        self._tls_context: ssl.SSLContext | None = None
        if config.tls_port is not None:
            if config.tls_cert is None or config.tls_key is None:
                raise ValueError("a TLS listener needs tls_cert and tls_key")
            self._tls_context = server_context(config.tls_cert, config.tls_key, config.tls_ca)
        # The primary listener (plain, else TLS), whose port ``port`` reports.
        self._server: ThreadedAssociationServer | None = None
        self._listeners: list[_GuardedServer] = []
        self._handed = False
        self.ae = self._build_ae()
        #: which pynetdicom hooks took (set by start())
        self.hooks: pynetdicom_hooks.HookReport | None = None
        self._pdu_limits = socket_reader.PduLimits(
            max_pdu=config.max_pdu,
            request_seconds=_association_request_seconds(config.idle_timeout),
            pdu_seconds=config.idle_timeout,
        )

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.aet)
        ae.add_supported_context(Verification)
        for abstract_syntax in self.services.contexts:
            ae.add_supported_context(abstract_syntax)
        for abstract_syntax in self.services.role_contexts:
            ae.add_supported_context(abstract_syntax, scu_role=True, scp_role=True)
        # pynetdicom checks one called AE title; with several, _on_requested does.
        ae.require_called_aet = not self.config.aet_aliases
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        ae.network_timeout = self.config.idle_timeout
        # Also the ARTIM timeout: how long a connection may stay silent before
        # its A-ASSOCIATE-RQ, holding a slot.
        ae.acse_timeout = _association_request_seconds(self.config.idle_timeout)
        ae.dimse_timeout = self.config.idle_timeout
        return ae

    @property
    def port(self) -> int:
        """The primary listener's bound port: the plain one, else the TLS one.

        Useful when configured as 0.
        """
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's bound port, or None without TLS."""
        for server in self._listeners:
            if server.ssl_context is not None:
                return int(server.server_address[1])
        return None

    def start(self, *, handed: bool = False) -> None:
        """Listen on the configured ports; ``handed``: listen on none, and serve the
        connections another process accepted on them instead (:meth:`adopt`)."""
        self._handed = handed
        # Datasets stream into the spool's incoming/ (a 1 GiB instance needs the
        # volume, not memory) in the spool's format; the report is logged there.
        limits = InstanceLimits(self.config.max_instance_size, self.config.min_free_disk)
        self.hooks = pynetdicom_hooks.install(self.incoming_dir, limits)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            *self.services.handlers,
        ]
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if self.config.port is not None:
            listeners.append((self.config.port, None))
        if self.config.tls_port is not None:
            listeners.append((self.config.tls_port, self._tls_context))
        try:
            for port, context in listeners:
                self._listen(port, context, handlers)
        except BaseException:
            self._close_listeners()
            raise
        self._server = self._listeners[0]

    def _listen(self, port: int, context: ssl.SSLContext | None, handlers: list[Any]) -> None:
        server = cast(
            _GuardedServer,
            self.ae.make_server(
                (self.config.host, port),
                ssl_context=context,
                evt_handlers=handlers,
                server_class=_HandedServer if self._handed else _GuardedServer,
                request_handler=_GuardedHandler,
            ),
        )
        server.configure(self._gate, handshake_timeout=self.config.idle_timeout)
        self.ae._servers.append(server)  # as AE.start_server does: AE.shutdown() finds it
        self._listeners.append(server)
        bound = int(server.server_address[1])
        if self._handed:
            return  # the accepting process listens, and logs it
        threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{bound}", daemon=True
        ).start()
        log.info(
            "receiver_listening",
            extra={
                "aet": self.config.aet,
                "host": self.config.host,
                "port": bound,
                "tls": context is not None,
                "client_certificates": context is not None
                and context.verify_mode == ssl.CERT_REQUIRED,
                "allow_list": "off" if self.policy.open else "on",
            },
        )

    def adopt(self, sock: socket.socket, address: tuple[str, int], *, tls: bool) -> None:
        """Serve a connection another process accepted on the plain (or TLS) port.

        The same path as a connection accepted here: the gate, then (TLS) the
        handshake and the association in a thread of its own.
        """
        server = next((s for s in self._listeners if (s.ssl_context is not None) == tls), None)
        if server is None:
            sock.close()
            return
        request: socket.socket = sock
        if server.ssl_context is not None:
            request = server.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        if server.verify_request(request, address):
            server.process_request(request, address)
        else:
            server.shutdown_request(request)

    def open_connections(self) -> int:
        """Connections admitted and not yet ended (the gate's count)."""
        return self._gate.count()

    def _close_listeners(self) -> None:
        for server in self._listeners:
            with contextlib.suppress(Exception):
                server.shutdown()
        self._listeners = []
        self._server = None

    def active_associations(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    @property
    def paused(self) -> bool:
        """True between ``pause()`` and ``resume()``."""
        return getattr(self, "_pause_reason", None) is not None

    def pause(self, reason: str) -> None:
        """Stop accepting new associations: close the DICOM ports, keep those in progress.

        pynetdicom can refuse an association at negotiation only for a wrong AE
        title or too many associations, not for a reason of ours. So while
        stowaway must not take new work (the service pauses while free disk is
        below --min-free-disk), the listening sockets (plain and TLS) are
        closed: a sender's connection is refused and it keeps its copy to send
        again later. Associations in progress go on (each C-STORE is still refused
        with 0xA700 if it cannot be stored). ``resume()`` listens again on the
        same addresses with the same server objects, so their handlers, TLS
        context and allow-list are kept.
        """
        import socketserver

        servers = self._pausable_servers()
        if not servers or self.paused:
            return
        for server in servers:
            # BaseServer.shutdown only ends serve_forever; AssociationServer.shutdown
            # would also unregister the server, which stop() does (stop() also
            # drains the associations in progress, paused or not).
            socketserver.BaseServer.shutdown(server)
            server.server_close()
        self._pause_reason: str | None = reason
        log.warning(
            "receiver_paused",
            extra={
                "reason": reason,
                "ports": [int(s.server_address[1]) for s in servers],
                "active_associations": self.active_associations(),
            },
        )

    def resume(self) -> bool:
        """Listen again after ``pause()``; False (still paused) if a port cannot be bound."""
        servers = self._pausable_servers()
        if not servers or not self.paused:
            return True
        for server in servers:
            if server.socket is not None and server.socket.fileno() != -1:
                continue  # listening again already (an earlier resume got this far)
            port = int(server.server_address[1])
            server.socket = socket.socket(server.address_family, server.socket_type)
            try:
                server.server_bind()
                server.server_activate()
            except OSError as exc:
                server.socket.close()
                log.error("receiver_resume_failed", extra={"port": port, "error": str(exc)})
                return False
            threading.Thread(
                target=server.serve_forever, name=f"AcceptorServer@{port}", daemon=True
            ).start()
        self._pause_reason = None
        log.info("receiver_resumed", extra={"ports": [int(s.server_address[1]) for s in servers]})
        return True

    def _pausable_servers(self) -> list[ThreadedAssociationServer]:
        """Every listener pause()/resume() act on (the plain one and the TLS one)."""
        listeners = list(getattr(self, "_listeners", None) or [])
        if not listeners and self._server is not None:
            listeners = [self._server]
        return listeners

    def stop(self, grace: float) -> None:
        """Stop accepting, wait for associations in progress, then abort the rest."""
        if not self._listeners:
            return
        servers = self._listeners
        self._close_listeners()

        def in_progress() -> list[Association]:
            return [a for server in servers for a in server.active_associations]

        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            # Connections that never negotiated (port probes, half-open peers)
            # have nothing in progress: only established associations get the grace.
            if not any(a.is_established for a in in_progress()):
                break
            time.sleep(0.05)
        remaining = in_progress()
        for assoc in remaining:
            assoc.abort()
        aborted = sum(1 for a in remaining if a.is_established)
        log.info("receiver_stopped", extra={"aborted_associations": aborted})

    # -- event handlers: logging, counters and the peer check ---------------

    def _on_c_store(self, event: Event) -> Dataset | int:
        requestor = event.assoc.requestor
        refusal = self.policy.refusal(str(requestor.ae_title).strip(), requestor.address)
        if refusal is not None:
            # Unreachable while pynetdicom honours the reject sent from EVT_REQUESTED
            # (see the module docstring); kept so that a change there fails closed.
            log.error(
                "c_store_refused",
                extra={
                    "calling_aet": str(requestor.ae_title).strip(),
                    "peer": requestor.address,
                    "reason": refusal,
                },
            )
            status = Dataset()
            status.Status = NOT_AUTHORIZED
            status.ErrorComment = "Not authorized"
            return status
        return self.handler(event)

    def _on_conn_open(self, event: Event) -> None:
        # Answer each C-STORE at once instead of waiting on Nagle's algorithm.
        sock = event.assoc.dul.socket
        raw = getattr(sock, "socket", None) if sock is not None else None
        if isinstance(raw, socket.socket):
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Whole PDUs per recv, bounded in size and time; threads woken by work.
        pynetdicom_hooks.prepare_connection(event.assoc, self._pdu_limits)
        with self.counters.lock:
            self.counters.open += 1
        self.on_association("open")

    def _on_conn_close(self, event: Event) -> None:
        with self.counters.lock:
            self.counters.open -= 1
        assoc = event.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None:
            # Closed before any A-ASSOCIATE-RQ (a port probe, a scanner, a refused
            # TLS peer): the association thread would otherwise wait the whole ARTIM
            # timeout for a request that cannot come, holding one of
            # --max-associations. An empty read is what that wait returns on timeout.
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
        _discard_partial_dataset(assoc)
        self.on_association("close")

    @property
    def called_aets(self) -> frozenset[str]:
        """Every AE title this receiver answers to."""
        return frozenset((self.config.aet, *self.config.aet_aliases))

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        called = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        if called not in self.called_aets:
            assoc.acse.send_reject(*_REJECT_CALLED_AET)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        if self.policy.refusal(calling, assoc.requestor.address) is None:
            return
        # pynetdicom skips its negotiation once the association is rejected here;
        # EVT_REJECTED is triggered as its own rejections do, for the log and counters.
        assoc.acse.send_reject(*_REJECT_CALLING_AET)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        with self.counters.lock:
            self.counters.accepted += 1
        requestor = event.assoc.requestor
        fields: dict[str, Any] = {
            "calling_aet": str(requestor.ae_title).strip(),
            "peer": requestor.address,
        }
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket):
            fields["tls"] = sock.version()
            subject = _certificate_subject(sock)
            if subject:
                fields["client_certificate"] = subject
        log.info("association_accepted", extra=fields)
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
                "reason": _reject_reason(event, self.policy, self.called_aets),
            },
        )
        self.on_association("rejected")

    def _on_aborted(self, event: Event) -> None:
        log.warning("association_aborted", extra={"peer": event.assoc.requestor.address})


def _association_request_seconds(idle_timeout: float) -> float:
    """How long a connection has for its whole A-ASSOCIATE-RQ (the ARTIM timeout)."""
    return min(30.0, idle_timeout)


def _discard_partial_dataset(assoc: Association) -> None:
    """Remove the incoming file of a C-STORE cut off mid-dataset (abort, reset, timeout).

    Its handler never runs, and nothing else would remove the file before the
    next restart: each cut transfer would keep up to a whole instance of disk.
    pynetdicom resets ``dimse.message`` once a message is complete, so what is
    left there when the connection closes is a partial one.
    """
    message = getattr(assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    name = getattr(partial, "name", None)
    if partial is None or not isinstance(name, str):
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        Path(name).unlink(missing_ok=True)
        log.info("partial_dataset_discarded", extra={"peer": assoc.requestor.address})


def _reject_reason(event: Event, policy: PeerPolicy, called_aets: frozenset[str]) -> str:
    assoc = event.assoc
    primitive_rq = assoc.requestor.primitive
    called = str(getattr(primitive_rq, "called_ae_title", "") or "").strip()
    calling = str(getattr(primitive_rq, "calling_ae_title", "") or "").strip()
    if called not in called_aets:
        return "called AE title not recognised"
    refusal = policy.refusal(calling, assoc.requestor.address)
    if refusal is not None:
        return refusal
    return "too many associations"


def _certificate_subject(sock: ssl.SSLSocket) -> str:
    """The client certificate's common name (verified certificates only)."""
    with contextlib.suppress(ValueError, OSError):
        cert: dict[str, Any] = dict(sock.getpeercert() or {})
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return str(value)
    return ""


class _Gate:
    """Admission of TCP connections, shared by the listeners of one AE.

    A connection is refused when the allow-list has no entry for its address, or
    when ``max_connections`` are already taken. Every admitted connection is
    counted from its admission in the accept loop (so a burst cannot outrun the
    threads it starts) until its association thread ends: first as *starting*
    (TLS handshake, setting up), then by its :class:`Association`, which
    :class:`_GuardedHandler` hands over under the same lock, so that no
    connection is ever counted twice or not at all.
    """

    def __init__(self, policy: PeerPolicy, max_connections: int) -> None:
        self.policy = policy
        self.max_connections = max_connections
        self._starting = 0
        self._associations: list[Association] = []
        self._lock = threading.Lock()

    def admit(self, peer: str) -> str | None:
        """Why a connection from ``peer`` is refused, or None: then it is counted."""
        if not self.policy.address_admitted(peer):
            return "source address not in the allow-list"
        with self._lock:
            if self._open() >= self.max_connections:
                return "too many connections"
            self._starting += 1
        return None

    def count(self) -> int:
        """Connections admitted and not yet ended."""
        with self._lock:
            return self._open()

    def _open(self) -> int:
        """Connections admitted and not yet ended (under the lock): forgets the ended ones."""
        # Not started yet (ident None) or still running: the connection is open.
        self._associations = [a for a in self._associations if a.ident is None or a.is_alive()]
        return self._starting + len(self._associations)

    def hand_over(self, assoc: Association) -> None:
        """The starting connection now has its association: count that instead."""
        with self._lock:
            self._starting -= 1
            self._associations.append(assoc)

    def abandon(self) -> None:
        """The starting connection ended before it had an association."""
        with self._lock:
            self._starting -= 1


class _GuardedHandler(RequestHandler):
    """pynetdicom's request handler, telling the gate which association a connection got."""

    server: _GuardedServer

    def handle(self) -> None:
        # As RequestHandler.handle, with the hand-over between creating the
        # association and starting its thread.
        try:
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        except BaseException:
            self.server.gate.abandon()
            raise
        self.server.gate.hand_over(assoc)
        assoc.start()


class _GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a gate at accept time and off-thread TLS.

    pynetdicom wraps an accepted socket in ``get_request`` with the default
    ``do_handshake_on_connect=True``: the TLS handshake runs in the accept loop, so
    a single client that connects and sends nothing blocks every other connection.
    Here the handshake runs in the connection's own thread, bounded by the idle
    timeout. Before that, ``verify_request`` (socketserver's hook, in the accept
    loop) asks the :class:`_Gate`, which bounds the threads peers can make the
    service hold.
    """

    daemon_threads = True
    gate: _Gate
    handshake_timeout: float = 30.0

    def configure(self, gate: _Gate, *, handshake_timeout: float) -> None:
        self.gate = gate
        self.handshake_timeout = handshake_timeout

    @property
    def _kind(self) -> str:
        return "tls" if self.ssl_context is not None else "plain"

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context is not None:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> bool:
        peer = str(client_address[0])
        reason = self.gate.admit(peer)
        if reason is None:
            return True
        log.warning(
            "connection_refused",
            extra={
                "peer": peer,
                "port": self.server_address[1],
                "transport": self._kind,
                "reason": reason,
            },
        )
        return False

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.gate.abandon()
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        previous = sock.gettimeout()
        try:
            sock.settimeout(self.handshake_timeout)
            sock.do_handshake()
            sock.settimeout(previous)
            return True
        except (OSError, ValueError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else _handshake_failure(exc)
            log.warning(
                "tls_handshake_failed",
                extra={
                    "peer": str(client_address[0]),
                    "port": self.server_address[1],
                    "reason": reason,
                },
            )
            return False


def _handshake_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return first_line(exc)


class _HandedServer(_GuardedServer):
    """A :class:`_GuardedServer` that listens on nothing: its connections were accepted
    by another process, which hands them over (:meth:`Receiver.adopt`)."""

    def server_bind(self) -> None:
        pass  # server_address stays the accepting process's address

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        # serve_forever never ran, so BaseServer.shutdown would wait for ever.
        self.server_close()
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)
