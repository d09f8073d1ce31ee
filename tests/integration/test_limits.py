"""Per-service limits: one peer cannot hold every association, or hold one forever.

``--max-associations`` caps concurrent associations (the next one is rejected,
transient, "local limit exceeded"); TCP connections beyond twice that are closed
at once; ``--idle-timeout`` aborts a silent association and drops a silent
connection that never negotiates.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.support import scu
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct

pytestmark = pytest.mark.timeout(120)

LOCAL_LIMIT_EXCEEDED = 0x02


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: limits are the receiver's, whatever the queue database."""
    yield sqlite_url(tmp_path)


def test_associations_beyond_the_maximum_are_rejected(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive", "--max-associations", "2")
    # Port probes (connect, close) do not hold a slot until the ARTIM timeout.
    for _ in range(3):
        socket.create_connection(("127.0.0.1", proc.port)).close()
    time.sleep(0.2)
    with contextlib.ExitStack() as held:
        for _ in range(2):
            assoc = held.enter_context(scu.associate(proc.port, calling="GREEDY"))
            assert assoc.is_established
        with scu.associate(proc.port, calling="GREEDY") as third:
            assert third.is_rejected
            rejection = third.acceptor.primitive
            assert rejection is not None
            assert (rejection.result, rejection.diagnostic) == (0x02, LOCAL_LIMIT_EXCEEDED)
    # Released: there is room again.
    assert scu.send(proc.port, make_ct(tmp_path / "ct.dcm"), calling="POLITE") == "stored"
    log = proc.log()
    assert (
        "association_rejected calling_aet=GREEDY called_aet=IMPORTADAPTER peer=127.0.0.1 "
        'reason="too many associations"'
    ) in log
    assert proc.stop() == 0


def test_an_idle_association_is_aborted(stowaway: StowawayFactory) -> None:
    proc = stowaway("receive", "--idle-timeout", "1")
    with scu.associate(proc.port, calling="SLEEPY", timeout=30) as assoc:
        assert assoc.is_established
        started = time.monotonic()
        while assoc.is_established and time.monotonic() - started < 15:
            time.sleep(0.05)
        idle = time.monotonic() - started
        assert assoc.is_aborted
    assert 0.8 < idle < 5, idle
    assert "association_aborted peer=127.0.0.1" in proc.log()
    assert proc.stop() == 0


def test_silent_connections_are_capped_and_dropped(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    # --max-associations 2: at most 4 connections (negotiating or associated).
    proc = stowaway("receive", "--max-associations", "2", "--idle-timeout", "5")
    connections = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(6)]
    try:
        started = time.monotonic()
        # The ones beyond the cap are closed at once, without a word. (Usually the
        # last two; one more if the start-up port probe still held its slot.)
        closed_at_once: list[socket.socket] = []
        while time.monotonic() - started < 1.5:
            readable, _, _ = select.select(connections, [], [], 0.1)
            for sock in readable:
                if sock not in closed_at_once:
                    with contextlib.suppress(ConnectionResetError):
                        assert sock.recv(1) == b""
                    closed_at_once.append(sock)
        assert 2 <= len(closed_at_once) <= 3, len(closed_at_once)
        # The others never send an A-ASSOCIATE-RQ: dropped after the idle timeout.
        for sock in connections:
            if sock not in closed_at_once:
                sock.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""
        dropped = time.monotonic() - started
    finally:
        for sock in connections:
            sock.close()
    assert 3 < dropped < 10, dropped
    assert scu.send(proc.port, make_ct(tmp_path / "ct.dcm"), calling="LATER") == "stored"
    assert (
        f"connection_refused peer=127.0.0.1 port={proc.port} transport=plain "
        'reason="too many connections"'
    ) in proc.log()
    assert proc.stop() == 0
