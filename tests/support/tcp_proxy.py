"""A loopback TCP proxy that can be cut: the network between stowaway and a
destination or its queue database.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


class TcpProxy:
    """A loopback TCP proxy to ``target_port`` whose link the test can break.

    ``cut()`` resets every relayed connection (both ends see the reset at once)
    and refuses new ones; ``restore()`` listens again on the same port.
    ``lose_commit_answer(marker)`` arms a subtler fault for Postgres: in the
    next transaction whose statements contain ``marker``, the ``COMMIT`` reaches
    the server but its answer never comes back, and the connection is reset a
    moment later. The transaction is committed; the client cannot know it.
    ``black_hole()`` stops relaying in both directions while every connection
    stays open and new ones are still accepted: a half-open network, where
    bytes go out and nothing ever comes back.

    Each socket is shut down before it is closed: closing a socket that another
    thread is blocked reading does not close the connection (the kernel keeps
    it for the blocked ``recv``), so no reset is sent and the far end waits for
    ever on a connection that looks alive, which is not an outage.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._links: list[_Link] = []
        self._holed = False
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._autocommit = False
        #: set once an armed COMMIT answer has been lost
        self.commit_answer_lost = threading.Event()

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self._links, self._holed = [], False
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            _reset(conn)

    def black_hole(self) -> None:
        """Drop every byte from now on, both ways, on open and on new connections."""
        with self._lock:
            self._holed = True
            links = list(self._links)
        for link in links:
            link.holed.set()

    def lose_commit_answer(self, marker: bytes, *, autocommit: bool = False) -> None:
        """Arm: lose the answer to the COMMIT of the next transaction mentioning ``marker``.

        With ``autocommit`` the statement mentioning ``marker`` is its own
        transaction: the answer to that statement is lost.
        """
        self.commit_answer_lost.clear()
        with self._lock:
            self._marker = marker
            self._autocommit = autocommit

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _reset(client)
                    _reset(upstream)
                    continue
                self._conns += [client, upstream]
                link = _Link(client, upstream)
                self._links.append(link)
                if self._holed:
                    link.holed.set()
            threading.Thread(target=self._requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._answers, args=(link,), daemon=True).start()

    def _requests(self, link: _Link) -> None:
        try:
            while data := link.client.recv(65536):
                if link.holed.is_set():
                    continue
                link.upstream.sendall(data)
                self._watch(link, data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                link.upstream.shutdown(socket.SHUT_WR)

    def _watch(self, link: _Link, data: bytes) -> None:
        with self._lock:
            marker = self._marker
        if marker is None:
            return
        if marker in data:
            link.marked = True
        if link.marked and (self._autocommit or b"COMMIT\x00" in data):
            with self._lock:
                if self._marker is None:  # another connection was quicker
                    return
                self._marker = None
            link.mute.set()  # the server commits; its answer goes nowhere
            self.commit_answer_lost.set()
            threading.Timer(0.5, lambda: (_reset(link.client), _reset(link.upstream))).start()

    @staticmethod
    def _answers(link: _Link) -> None:
        try:
            while data := link.upstream.recv(65536):
                if not (link.mute.is_set() or link.holed.is_set()):
                    link.client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    marked: bool = False
    mute: threading.Event = field(default_factory=threading.Event)
    #: relay nothing more, either way (``black_hole``)
    holed: threading.Event = field(default_factory=threading.Event)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset, waking any thread blocked on the socket first."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()
