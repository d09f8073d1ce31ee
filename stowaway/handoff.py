"""The control channel between the accepting process and one receiver process.

A Unix ``SOCK_SEQPACKET`` socket pair: every message is one record (no framing
to get wrong), and an accepted TCP connection travels with its message as a
file descriptor (``SCM_RIGHTS``). Messages are pickled tuples whose first item
names them; only the two processes of one stowaway hold the pair's ends.

Accepting process to receiver process:

* ``("hello", Settings, index, plain_port, tls_port, max_associations)``: first;
* ``("connection", (host, port), tls)`` with the connection's descriptor;
* ``("stop",)``: stop as on SIGTERM (drain within ``--grace-period``).

Receiver process to accepting process:

* ``("ready", pid)``: serving;
* ``("store", status, seconds, size_bytes)``: one C-STORE answered, sent before
  the answer goes out (so a scrape after the sender saw it counts it);
* ``("association", kind)``: open, close, accepted, rejected;
* ``("load", adopted, open)``: connections handed over so far, and open now.
"""

from __future__ import annotations

import array
import pickle
import socket
from typing import Any

#: Longest message (the hello, with the settings, is the longest by far).
MAX_MESSAGE = 1 << 20

Message = tuple[Any, ...]
#: Descriptors one message may carry (one is ever sent).
_MAX_FDS = 4


def channel() -> tuple[socket.socket, socket.socket]:
    """A connected pair: (the accepting process's end, the receiver process's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: Message, fds: tuple[int, ...] = ()) -> None:
    """Send one message (and ``fds``); OSError when the other end is gone."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket, *, wait: bool = True) -> tuple[Message, list[int]] | None:
    """The next message and the descriptors that came with it; None at end of file.

    ``wait=False`` raises BlockingIOError when no message is waiting.
    """
    flags = 0 if wait else socket.MSG_DONTWAIT
    # Not socket.recv_fds: before Python 3.12 it drops ``flags``.
    fds = array.array("i")
    data, ancillary, msg_flags, _address = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(_MAX_FDS * fds.itemsize), flags
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    received = list(fds)
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in received:
            socket.close(fd)
        raise OSError("control message truncated")
    message = pickle.loads(data)
    if not isinstance(message, tuple) or not message:
        raise OSError("malformed control message")
    return message, received
