"""``--allowed-peers AE@CIDR``: who may send, from where, against a real stowaway process.

Loopback has a whole /8: senders bind 127.0.0.2, 127.0.0.3... as their source
address to play hosts on different networks.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.support import scu
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct
from tests.support.processes import ECHOSCU

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the allow-list does not touch the queue database."""
    yield sqlite_url(tmp_path)


def send(port: int, dicom: Path, calling: str, source: str) -> str:
    return scu.send(port, dicom, calling=calling, source=source)


def test_ae_titles_bound_to_source_networks(stowaway: StowawayFactory, tmp_path: Path) -> None:
    proc = stowaway(
        "receive",
        "--allowed-peers",
        "CT1@127.0.0.2/32,*@127.0.0.3,MR1@127.0.0.4",
        "--allowed-calling-aets",
        "PACS",
    )
    ct = make_ct(tmp_path / "ct.dcm")
    # Admitted: the AE title from its network, anything from the wildcard network,
    # and --allowed-calling-aets from anywhere (one instance each: one row each).
    for seed, (calling, source) in enumerate(
        [("CT1", "127.0.0.2"), ("WHOEVER", "127.0.0.3"), ("PACS", "127.0.0.9")]
    ):
        instance = make_ct(tmp_path / f"ct{seed}.dcm", seed=seed + 1)
        assert send(proc.port, instance, calling, source) == "stored"
    # Rejected at A-ASSOCIATE with "calling AE title not recognised" (diagnostic 3):
    # a known AE title from the wrong host, an unknown AE title from a known host.
    assert send(proc.port, ct, "CT1", "127.0.0.4") == "rejected 0x3"
    assert send(proc.port, ct, "INTRUDER", "127.0.0.2") == "rejected 0x3"
    # A source address no entry covers (except the any-address PACS): its AE title
    # is refused too. DCMTK sees the same rejection.
    assert send(proc.port, ct, "CT1", "127.0.0.9") == "rejected 0x3"
    echo = subprocess.run(
        [ECHOSCU, "-aec", "IMPORTADAPTER", "-aet", "CT1", "127.0.0.1", str(proc.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
    rows = json.loads(proc.cli("queue", "ls", "--json").stdout)
    assert sorted(r["calling_aet"] for r in rows) == ["CT1", "PACS", "WHOEVER"]
    log = proc.log()
    for line in (
        'association_rejected calling_aet=CT1 called_aet=IMPORTADAPTER peer=127.0.0.4 reason="calling AE title not allowed from this address"',  # noqa: E501
        'association_rejected calling_aet=INTRUDER called_aet=IMPORTADAPTER peer=127.0.0.2 reason="calling AE title not allowed"',  # noqa: E501
        'association_rejected calling_aet=CT1 called_aet=IMPORTADAPTER peer=127.0.0.9 reason="calling AE title not allowed from this address"',  # noqa: E501
    ):
        assert line in log
    assert proc.stop() == 0


def test_unknown_source_addresses_are_closed_before_negotiation(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    proc = stowaway("receive", "--allowed-peers", "CT1@127.0.0.2,*@127.0.8.0/24")
    ct = make_ct(tmp_path / "ct.dcm")
    assert send(proc.port, ct, "CT1", "127.0.0.2") == "stored"
    assert send(proc.port, ct, "ANY", "127.0.8.200") == "stored"
    # No entry covers 127.0.0.1 or 127.0.9.1: the TCP connection is closed at once,
    # before any association thread exists.
    assert send(proc.port, ct, "CT1", "127.0.0.1") == "no association"
    assert send(proc.port, ct, "ANY", "127.0.9.1") == "no association"
    dcmtk = subprocess.run(
        [ECHOSCU, "-aec", "IMPORTADAPTER", "-aet", "CT1", "127.0.0.1", str(proc.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dcmtk.returncode != 0
    # What Google's guide calls "Peer aborted Association (or never connected)".
    assert "Peer aborted Association (or never connected)" in dcmtk.stdout + dcmtk.stderr
    log = proc.log()
    for peer in ("127.0.0.1", "127.0.9.1"):
        assert (
            f"connection_refused peer={peer} port={proc.port} transport=plain "
            'reason="source address not in the allow-list"'
        ) in log
    assert log.count("association_accepted") == 2
    assert proc.stop() == 0
