"""Reading whole PDUs from an association's socket: fast, and bounded against a hostile peer.

pynetdicom's ``AssociationSocket.recv(n)`` reads ``n`` bytes in 4 KiB pieces,
appending each to a ``bytearray``: a 16 KiB P-DATA PDU costs four ``recv``
calls and four copies, for every PDU of every instance. :class:`PduReader`
gives one association's socket a ``recv`` with the same contract (return up to
``n`` bytes, fewer only when the connection ended) that reads a whole PDU in as
few calls as the network allows.

pynetdicom reads each PDU as ``recv(6)`` (type, reserved byte, length) and then
``recv(length)``, trusting the length the peer declared: six bytes
``01 00 40 00 00 00`` on a bare TCP connection made it allocate 1 GiB, and a
peer that sends one byte every two seconds held its connection (and thread)
forever, since pynetdicom's timers are only looked at between PDUs. So the
reader takes the whole PDU at the header call and

* refuses a declared length above what we accept (:class:`PduLimits`): a
  P-DATA-TF longer than the maximum length we negotiated (``--max-pdu``, plus
  the header for senders that count it), an A-ASSOCIATE PDU above 1 MiB (one
  with 128 presentation contexts is a few KiB), a release, reject or abort PDU
  above a few bytes (the standard fixes them at 4);
* grows the buffer only as bytes arrive (:data:`GROW_STEP` at a time), so a
  declared length costs no memory that was not sent;
* holds the whole A-ASSOCIATE-RQ to one deadline from the connection's start
  (the ARTIM timeout), and every later PDU to ``--idle-timeout`` from its
  first byte: a trickle of bytes cannot keep a connection alive.

A refused or late PDU is logged once (naming the peer), answered with an
A-ABORT PDU, and reported to pynetdicom as a connection that ended before a
whole header: it closes the connection the ordinary way (Evt17), which aborts
an association in progress and discards its partial dataset.

It also acknowledges what it reads at once (``TCP_QUICKACK``). Senders that
leave Nagle's algorithm on (DCMTK does unless ``TCP_NODELAY=1`` is in its
environment) hold back a small segment until the previous one is acknowledged;
a receiver that delays its ACKs (Linux does, up to 40 ms) and has nothing to
answer yet, because it is waiting for the rest of the C-STORE, then stalls
every small instance by that much. Linux falls back to delayed ACKs by
itself, so the option is set again after every read.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Final

log = logging.getLogger("stowaway.receiver")

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

#: Type, a reserved byte and the 4-byte length of what follows (PS3.8 9.3).
PDU_HEADER: Final = 6
#: The largest A-ASSOCIATE-RQ/AC accepted: far above any real one.
ASSOCIATION_PDU_MAX: Final = 1024 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a 4-byte body; a little slack.
FIXED_PDU_MAX: Final = 64
#: A buffer is never extended by more than this ahead of the bytes received.
GROW_STEP: Final = 1024 * 1024
#: A deadline may be overrun by at most this many seconds.
_TIMEOUT_SLACK: Final = 0.5

_PDU_NAMES: Final = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_A_ASSOCIATE_RQ: Final = 0x01
_P_DATA_TF: Final = 0x04

#: A-ABORT from the service provider (source 2), PS3.8 9.3.8.
_ABORT_INVALID_PARAMETER: Final = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
_ABORT_NOT_SPECIFIED: Final = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00))


@dataclass(frozen=True)
class PduLimits:
    """What one connection may send: PDU sizes and how long a PDU may take to arrive."""

    #: our maximum length received (``--max-pdu``): the longest P-DATA-TF body
    max_pdu: int
    #: seconds from the connection's start until the whole A-ASSOCIATE-RQ is in
    request_seconds: float
    #: seconds for every later PDU, from its first byte
    pdu_seconds: float

    def max_length(self, pdu_type: int) -> int | None:
        """The longest body accepted for a PDU of this type; None for an unknown type."""
        if pdu_type == _P_DATA_TF:
            return self.max_pdu + PDU_HEADER
        if pdu_type in (0x01, 0x02):
            return ASSOCIATION_PDU_MAX
        if pdu_type in _PDU_NAMES:
            return FIXED_PDU_MAX
        return None


class _Expired(Exception):
    """The PDU being read missed its deadline, ``received`` bytes into the read."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class PduReader:
    """The ``recv`` of one accepted ``pynetdicom.transport.AssociationSocket``."""

    def __init__(self, assoc_socket: Any, limits: PduLimits) -> None:
        self._assoc_socket = assoc_socket
        self._limits = limits
        self._peer = _peer_of(getattr(assoc_socket, "socket", None))
        # Until the A-ASSOCIATE-RQ is in, every PDU shares this one deadline.
        self._request_deadline: float | None = time.monotonic() + limits.request_seconds
        # The rest of a PDU read with its header, for pynetdicom's next call.
        self._pending = bytearray()
        # The socket timeout set during this recv (None: not yet).
        self._timeout_set: float | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes`` bytes; fewer only when the connection ended or was refused."""
        pending = self._pending
        if len(pending) == nr_bytes:  # pynetdicom's call for the body read with its header
            self._pending = bytearray()
            return pending
        sock = self._assoc_socket.socket
        # Deadlines are socket timeouts while reading; pynetdicom's own (for its
        # sends) is put back before returning.
        previous = sock.gettimeout()
        self._timeout_set = None
        try:
            if pending:
                out = pending[:nr_bytes]
                del pending[:nr_bytes]
                if len(out) < nr_bytes:
                    out += self._read(sock, nr_bytes - len(out), self._deadline())
                return out
            if nr_bytes != PDU_HEADER:  # not pynetdicom's header call: read as asked
                return self._read(sock, nr_bytes, self._deadline())
            return self._read_pdu(sock)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def _deadline(self) -> float:
        if self._request_deadline is not None:
            return self._request_deadline
        return time.monotonic() + self._limits.pdu_seconds

    def _read_pdu(self, sock: socket.socket) -> bytearray:
        deadline = self._deadline()
        try:
            header = self._read(sock, PDU_HEADER, deadline)
            if len(header) < PDU_HEADER:
                return header
            pdu_type, length = struct.unpack(">BxL", header)
            limit = self._limits.max_length(pdu_type)
            if limit is None:
                return header  # pynetdicom refuses an unknown type itself (Evt19)
            if length > limit:
                self._refuse(
                    sock,
                    "pdu_refused",
                    _ABORT_INVALID_PARAMETER,
                    pdu_type=_PDU_NAMES[pdu_type],
                    declared_bytes=length,
                    limit_bytes=limit,
                    reason="declared PDU length above the limit",
                )
                return bytearray()
            body = self._read(sock, length, deadline)
        except _Expired as expired:
            self._refuse(
                sock,
                "pdu_too_slow",
                _ABORT_NOT_SPECIFIED,
                seconds=self._budget(),
                received_bytes=expired.received,
                reason="PDU did not arrive in time"
                if self._request_deadline is None
                else "association request did not arrive in time",
            )
            return bytearray()
        if len(body) < length:
            return bytearray()  # the peer closed mid-PDU: pynetdicom sees a closed connection
        if pdu_type == _A_ASSOCIATE_RQ:
            self._request_deadline = None
        self._pending = body
        return header

    def _budget(self) -> float:
        limits = self._limits
        return limits.request_seconds if self._request_deadline is not None else limits.pdu_seconds

    def _read(self, sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
        """Read ``nr_bytes`` (fewer if the peer closed) by ``deadline``, else raise _Expired."""
        buffer = bytearray(min(nr_bytes, GROW_STEP))
        got = 0
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(nr_bytes - got, GROW_STEP)))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired(got)
            # Set again only once the time left has shrunk noticeably: a system
            # call per read would tax every PDU for a bound that is in seconds.
            if self._timeout_set is None or remaining < self._timeout_set - _TIMEOUT_SLACK:
                sock.settimeout(remaining)
                self._timeout_set = remaining
            try:
                with memoryview(buffer) as view:
                    n = sock.recv_into(view[got:], len(buffer) - got)
            except TimeoutError:
                raise _Expired(got) from None
            if not n:  # the peer closed: return what there is, as pynetdicom does
                break
            got += n
            if _QUICKACK is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        if got < len(buffer):
            del buffer[got:]
        return buffer

    def _refuse(self, sock: socket.socket, event: str, abort_pdu: bytes, **fields: Any) -> None:
        log.warning(event, extra={"peer": self._peer, **fields})
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)  # a peer that does not read gets no more than this
            sock.sendall(abort_pdu)


def _peer_of(sock: Any) -> str:
    with contextlib.suppress(OSError, AttributeError, IndexError, TypeError):
        return str(sock.getpeername()[0])
    return ""


def install(assoc_socket: Any, limits: PduLimits) -> None:
    """Replace ``recv`` on this one ``pynetdicom.transport.AssociationSocket`` object."""
    assoc_socket.recv = PduReader(assoc_socket, limits).recv
