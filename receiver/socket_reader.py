"""Reading whole PDUs from an association's socket in as few calls as possible.

pynetdicom's ``AssociationSocket.recv(n)`` reads ``n`` bytes in 4 KiB pieces,
appending each to a ``bytearray``: a 16 KiB P-DATA PDU costs four ``recv``
calls and four copies, for every PDU of every instance. :func:`install` gives
one association's socket a ``recv`` with the same contract (return up to
``n`` bytes, fewer only when the peer closed; timeouts and errors raise as
before) that reads straight into a buffer of the full size.

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
import socket
from typing import Any

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def install(assoc_socket: Any) -> None:
    """Replace ``recv`` on this one ``pynetdicom.transport.AssociationSocket`` object."""

    def recv(nr_bytes: int) -> bytearray:
        sock = assoc_socket.socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:  # the peer closed: return what there is, as pynetdicom does
                    break
                got += n
                if _QUICKACK is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        finally:
            view.release()
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    assoc_socket.recv = recv
