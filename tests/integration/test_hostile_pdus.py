"""A peer's declared PDU length costs no memory it did not send, and a trickle keeps nothing open.

pynetdicom trusts the 4-byte length in a PDU header: six bytes on a bare TCP
connection used to allocate a buffer of that size, and a peer sending one byte
at a time held its connection forever. The receiver refuses a PDU longer than
what it accepts (P-DATA above --max-pdu, association PDUs above 1 MiB, the
fixed-size ones above a few bytes), and holds the A-ASSOCIATE-RQ to one
deadline from the connection's start and each later PDU to --idle-timeout.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.support import scu
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct
from tests.support.processes import ECHOSCU, StowawayProcess

pytestmark = pytest.mark.timeout(120)

#: An A-ASSOCIATE-RQ header declaring 1 GiB of body.
HUGE_ASSOCIATE_RQ = bytes.fromhex("010040000000")
RSS_LIMIT = 150 * 1024 * 1024


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: PDU handling is the receiver's, whatever the queue database."""
    yield sqlite_url(tmp_path)


def memory_bytes(proc: StowawayProcess, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of the stowaway process, in bytes."""
    assert proc.proc is not None
    text = Path(f"/proc/{proc.proc.pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, f"no {field} in /proc/PID/status"
    return int(match.group(1)) * 1024


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the receiver has closed the connection (reading past any A-ABORT)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if not readable:
            continue
        try:
            if not sock.recv(4096):
                return True
        except ConnectionResetError:
            return True
    return False


def echo(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ECHOSCU, "127.0.0.1", str(port), "-aec", "IMPORTADAPTER"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_huge_declared_pdu_length_allocates_nothing_and_closes(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive", "--idle-timeout", "5")
    assert echo(proc.port).returncode == 0
    before = memory_bytes(proc, "VmRSS")
    with contextlib.ExitStack() as stack:
        # One alone, then four at once.
        for batch in (1, 4):
            sockets = [
                stack.enter_context(socket.create_connection(("127.0.0.1", proc.port)))
                for _ in range(batch)
            ]
            for sock in sockets:
                sock.sendall(HUGE_ASSOCIATE_RQ)
            time.sleep(0.5)  # long enough to allocate, if it did
            rss, peak = memory_bytes(proc, "VmRSS"), memory_bytes(proc, "VmHWM")
            assert rss < RSS_LIMIT and peak < RSS_LIMIT, (before, rss, peak)
            for sock in sockets:
                assert closed_by_peer(sock, 5), "the connection stayed open"
    # The service still answers, and stores.
    assert echo(proc.port).returncode == 0
    assert scu.send(proc.port, make_ct(tmp_path / "ct.dcm"), calling="AFTER") == "stored"
    log = proc.log()
    assert log.count("pdu_refused peer=127.0.0.1 pdu_type=A-ASSOCIATE-RQ") == 5, log
    assert "declared_bytes=1073741824 limit_bytes=1048576" in log
    assert proc.stop() == 0


def test_a_p_data_pdu_longer_than_negotiated_is_refused(stowaway: StowawayFactory) -> None:
    proc = stowaway("receive", "--max-pdu", "16384")
    with scu.associate(proc.port, calling="OVERSIZE") as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        # 16 KiB negotiated; declare 16 KiB + 7 (one byte more than the header slack).
        raw.sendall(b"\x04\x00" + struct.pack(">I", 16384 + 7) + b"\x00" * 64)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
    assert (
        "pdu_refused peer=127.0.0.1 pdu_type=P-DATA-TF declared_bytes=16391 limit_bytes=16390"
    ) in proc.log()
    assert echo(proc.port).returncode == 0
    assert proc.stop() == 0


def test_an_association_request_trickling_in_does_not_outlive_the_deadline(
    stowaway: StowawayFactory,
) -> None:
    proc = stowaway("receive", "--idle-timeout", "3")
    # A plausible A-ASSOCIATE-RQ header (256 bytes of body), one byte per second.
    trickle = b"\x01\x00" + struct.pack(">I", 256) + b"\x00" * 256
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        closed = False
        for byte in trickle[:15]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_by_peer(sock, 1.0):
                closed = True
                break
        lasted = time.monotonic() - started
    assert closed, "a trickling peer kept its connection past 15 s"
    assert lasted < 6, lasted
    assert "pdu_too_slow peer=127.0.0.1" in proc.log()
    assert echo(proc.port).returncode == 0
    assert proc.stop() == 0


def test_a_pdu_trickling_into_an_association_does_not_outlive_the_idle_timeout(
    stowaway: StowawayFactory,
) -> None:
    proc = stowaway("receive", "--idle-timeout", "2")
    with scu.associate(proc.port, calling="TRICKLE", timeout=30) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        pdu = b"\x04\x00" + struct.pack(">I", 1000) + b"\x00" * 1000
        started = time.monotonic()
        for byte in pdu[:20]:  # one byte every half second: each within any per-read timeout
            if not assoc.is_established:
                break
            with contextlib.suppress(OSError):
                raw.sendall(bytes([byte]))
            time.sleep(0.5)
        lasted = time.monotonic() - started
        assert assoc.is_aborted
    assert lasted < 5, lasted
    assert "pdu_too_slow peer=127.0.0.1 seconds=2.0 received_bytes=" in proc.log()
    assert proc.stop() == 0
