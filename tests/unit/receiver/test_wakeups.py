"""pynetdicom's polling loops woken on work (receiver.wakeups)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from stowaway.receiver import wakeups


def waits_until_woken(wait: Callable[[float], None], wake: Callable[[], None]) -> float:
    """Seconds a 10 s ``wait`` lasted when ``wake`` was called 0.1 s into it."""
    returned = threading.Event()
    started = time.monotonic()

    def waiter() -> None:
        wait(10.0)
        returned.set()

    threading.Thread(target=waiter, daemon=True).start()
    time.sleep(0.1)
    assert not returned.is_set()
    wake()
    assert returned.wait(5.0), "the wait was not woken"
    return time.monotonic() - started


def test_event_waiter_returns_when_woken() -> None:
    waiter = wakeups._EventWaiter()
    assert waits_until_woken(waiter.wait, waiter.wake) < 5.0


def test_socket_waiter_returns_on_a_wake_up_and_on_incoming_data() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        waiter = wakeups._SocketWaiter(ours)
        assert waits_until_woken(waiter.wait, waiter.wake) < 5.0
        assert waits_until_woken(waiter.wait, lambda: peer.send(b"x")) < 5.0


def test_an_unprepared_thread_sleeps_as_before() -> None:
    started = time.monotonic()
    wakeups._Clock.sleep(0.05)
    assert time.monotonic() - started >= 0.05


def test_a_real_association_is_prepared_and_still_works() -> None:
    assert wakeups.install_clock()
    prepared: list[Any] = []

    def on_open(event: evt.Event) -> None:
        wakeups.install(event.assoc)
        prepared.append(getattr(event.assoc.dul, wakeups._WAITER, None))
        prepared.append(getattr(event.assoc, wakeups._WAITER, None))

    scp = AE()
    scp.add_supported_context(Verification)
    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)]
    )
    try:
        port = server.server_address[1]
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        for _ in range(20):  # each echo crosses both woken loops, twice
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert isinstance(prepared[0], wakeups._SocketWaiter)
    assert isinstance(prepared[1], wakeups._EventWaiter)
