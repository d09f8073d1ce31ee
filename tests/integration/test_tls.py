"""DICOM over TLS on the receiver: DCMTK's and pynetdicom's TLS senders against a real process.

A throw-away CA issues the server's certificate and a client certificate; a second
CA issues a "rogue" client certificate that must be refused like no certificate at all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StowawayFactory
from tests.support import scu
from tests.support.certs import Issued, TestCA
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct, read_uids
from tests.support.processes import STORESCU, StowawayProcess, dcmsend, free_port, wait_for_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: TLS is the same whatever the queue database."""
    yield sqlite_url(tmp_path)


class PKI:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "ca")
        self.server: Issued = self.ca.issue("server", server=True)
        self.client: Issued = self.ca.issue("client")
        self.rogue: Issued = TestCA(directory / "rogue-ca", "rogue-ca").issue("rogue")

    def client_context(self, cert: Issued | None) -> ssl.SSLContext:
        if cert is None:
            return scu.client_context(self.ca.cert)
        return scu.client_context(self.ca.cert, cert.cert, cert.key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def start_tls(
    stowaway: StowawayFactory, pki: PKI, *extra: str, client_certs: bool = True
) -> tuple[StowawayProcess, int]:
    tls_port = free_port()
    args = [
        "--tls-port",
        str(tls_port),
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        *(["--tls-ca", str(pki.ca.cert)] if client_certs else []),
        *extra,
    ]
    proc = stowaway("receive", *args, wait_port="--tls-only" not in extra)
    wait_for_port(tls_port, proc=proc.proc)
    return proc, tls_port


def storescu_tls(
    port: int, dicom: Path, *tls: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-v", "-aec", "IMPORTADAPTER", *tls, "127.0.0.1", str(port), str(dicom)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(proc: StowawayProcess) -> list[dict[str, object]]:
    return list(json.loads(proc.cli("queue", "ls", "--json").stdout))


def test_dcmtk_over_tls_with_a_client_certificate(
    stowaway: StowawayFactory, pki: PKI, tmp_path: Path
) -> None:
    proc, tls_port = start_tls(stowaway, pki)
    ct = make_ct(tmp_path / "tls.dcm", seed=1)
    result = storescu_tls(
        tls_port, ct, "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca.cert)
    )
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr + result.stdout
    [row] = rows(proc)
    assert row["sop_instance_uid"] == read_uids(ct).sop_uid
    log = proc.log()
    assert "association_accepted calling_aet=STORESCU peer=127.0.0.1 tls=TLSv1." in log
    assert "client_certificate=client" in log
    # The plain port keeps working next to the TLS one.
    plain = dcmsend(proc.port, [make_ct(tmp_path / "plain.dcm", seed=2)])
    assert plain.returncode == 0, plain.stderr
    assert len(rows(proc)) == 2
    assert proc.stop() == 0


def test_clients_without_a_valid_certificate_are_refused(
    stowaway: StowawayFactory, pki: PKI, tmp_path: Path
) -> None:
    proc, tls_port = start_tls(stowaway, pki)
    ct = make_ct(tmp_path / "ct.dcm")
    anonymous = storescu_tls(tls_port, ct, "+tla", "+cf", str(pki.ca.cert))
    rogue = storescu_tls(
        tls_port, ct, "+tls", str(pki.rogue.key), str(pki.rogue.cert), "+cf", str(pki.ca.cert)
    )
    for refused in (anonymous, rogue):
        assert refused.returncode != 0
        assert "Association Request Failed" in refused.stderr + refused.stdout
    # pynetdicom: no certificate, or a certificate from another CA.
    assert scu.send(tls_port, ct, tls=pki.client_context(None)) == "no association"
    assert scu.send(tls_port, ct, tls=pki.client_context(pki.rogue)) == "no association"
    # Plain DIMSE on the TLS port: the first PDU is not a TLS hello; closed.
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        plain.sendall(bytes.fromhex("01000000004400010000") + b"IMPORTADAPTER   " * 2)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := plain.recv(1024):  # at most a TLS alert, then the close
                received += chunk
        assert not received.startswith(b"\x02")  # never an A-ASSOCIATE-AC
    assert rows(proc) == []
    log = proc.log()
    refusal = f"tls_handshake_failed peer=127.0.0.1 port={tls_port} reason="
    assert refusal + '"peer did not return a certificate"' in log
    assert 'reason="certificate verify failed"' in log or 'reason="tlsv1 alert unknown ca"' in log
    assert "association_accepted" not in log
    assert proc.stop() == 0


def test_pynetdicom_over_tls_12_and_nothing_older(
    stowaway: StowawayFactory, pki: PKI, tmp_path: Path
) -> None:
    proc, tls_port = start_tls(stowaway, pki)
    context = pki.client_context(pki.client)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    ct = make_ct(tmp_path / "ct.dcm", seed=3)
    assert scu.send(tls_port, ct, tls=context) == "stored"
    assert [r["sop_instance_uid"] for r in rows(proc)] == [read_uids(ct).sop_uid]
    assert "tls=TLSv1.2 client_certificate=client" in proc.log()
    # TLS 1.1, offered by a client that allows it (OpenSSL at security level 0),
    # is refused by the server with a protocol_version alert.
    if shutil.which("openssl"):
        old = subprocess.run(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{tls_port}", "-tls1_1"),
                *("-cipher", "DEFAULT:@SECLEVEL=0"),
                *("-cert", str(pki.client.cert), "-key", str(pki.client.key)),
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "alert protocol version" in old.stdout + old.stderr
        assert 'reason="unsupported protocol"' in proc.log()
    assert proc.stop() == 0


def test_tls_only_closes_the_plain_port_and_server_auth_only_admits_any_client(
    stowaway: StowawayFactory, pki: PKI, tmp_path: Path
) -> None:
    proc, tls_port = start_tls(stowaway, pki, "--tls-only", client_certs=False)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proc.port), timeout=5).close()
    ct = make_ct(tmp_path / "ct.dcm", seed=4)
    # Without --tls-ca the server does not ask for a certificate: TLS encrypts and
    # authenticates the gateway to the sender only.
    result = storescu_tls(tls_port, ct, "+tla", "+cf", str(pki.ca.cert))
    assert result.returncode == 0, result.stderr
    assert len(rows(proc)) == 1
    log = proc.log()
    assert f"receiver_listening aet=IMPORTADAPTER host=127.0.0.1 port={tls_port} tls=True" in log
    assert "tls=False" not in log
    assert proc.stop() == 0


def test_a_silent_client_does_not_block_the_tls_listener(
    stowaway: StowawayFactory, pki: PKI, tmp_path: Path
) -> None:
    """pynetdicom alone would run each TLS handshake in its accept loop."""
    proc, tls_port = start_tls(stowaway, pki, "--idle-timeout", "2")
    silent = [socket.create_connection(("127.0.0.1", tls_port)) for _ in range(3)]
    try:
        ct = make_ct(tmp_path / "ct.dcm", seed=5)
        started = time.monotonic()
        assert scu.send(tls_port, ct, tls=pki.client_context(pki.client)) == "stored"
        assert time.monotonic() - started < 1.5
        # The silent ones are dropped after the idle timeout.
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 8
    finally:
        for sock in silent:
            sock.close()
    assert f'tls_handshake_failed peer=127.0.0.1 port={tls_port} reason="timed out"' in proc.log()
    assert proc.stop() == 0
