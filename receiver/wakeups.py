"""Wake pynetdicom's two polling loops when there is work, instead of on their next tick.

pynetdicom serves each association with two threads that poll:

* the DUL thread (``DULServiceProvider.run_reactor``) looks for an incoming
  PDU and for a primitive to send, and sleeps ``_run_loop_delay`` (1 ms)
  whenever it finds neither;
* the association thread (``Association._run_reactor``) sleeps 1 ms before
  every look for a decoded DIMSE message.

Every C-STORE crosses both, several times: each PDU of the dataset may wait
for the DUL's next tick, the complete message for the association's, the
response for the DUL's again. With instances that take 2 to 3 ms in all, those
ticks were a large part of each one.

:class:`Clock` is a ``time`` for both modules whose ``sleep`` still sleeps
for the same time at most, but, on a thread :func:`prepare` has given a
waiter, returns as soon as there is work (:mod:`receiver.pynetdicom_hooks`
installs both, after checking pynetdicom's shape):

* a DUL thread waits in ``select`` for its socket to become readable or for a
  byte on a wake-up socket, which is written whenever a primitive is queued
  for sending (``to_provider_queue.put``);
* an association thread waits on an ``Event`` set whenever the DUL queues a
  decoded message for it (``dimse.msg_queue.put``).

The longest sleep is unchanged, so timers (ARTIM, idle) and thread stops
behave as before, and any thread not prepared (a requestor, an unknown
pynetdicom) sleeps as it always did.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

#: The attribute that marks a prepared thread (the DUL or Association object itself).
_WAITER = "_stowaway_waiter"


class SocketWaiter:
    """Waits until a DUL's socket is readable or :meth:`wake` is called."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # Closed with this object: a socket pair needs no explicit close.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._wake_w.send(b"\0")

    def wait(self, seconds: float) -> None:
        try:
            readable, _, _ = select.select([self._sock, self._wake_r], [], [], seconds)
        except (OSError, ValueError):  # the socket closed under us: the loop notices
            time.sleep(seconds)
            return
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)


class EventWaiter:
    """Waits until :meth:`wake` is called."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> None:
        self._event.wait(seconds)
        # Cleared before the caller looks for work: a wake-up after this line
        # stays set, and one before it is for work the caller is about to find.
        self._event.clear()


class WakingQueue(queue.Queue[Any]):
    """A ``queue.Queue`` that calls ``on_put`` after every item it takes."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class Clock:
    """Stands in for the ``time`` module in pynetdicom's DUL and association modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waiter = getattr(threading.current_thread(), _WAITER, None)
        if waiter is None or seconds <= 0:
            time.sleep(seconds)
        else:
            waiter.wait(seconds)


def prepare(thread: threading.Thread, waiter: SocketWaiter | EventWaiter) -> None:
    """Make ``thread``'s sleeps (through :class:`Clock`) wait on ``waiter``."""
    setattr(thread, _WAITER, waiter)
