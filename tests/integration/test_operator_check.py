"""`stowaway check` as a real process against the Healthcare API stub, Orthanc, a fake
metadata server, and broken set-ups; on SQLite and Postgres."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from tests.support.certs import TestCA
from tests.support.databases import sqlite_url
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.metadata_server import MetadataServer
from tests.support.orthanc import OrthancServer
from tests.support.processes import free_port, run_cli

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    """For the destination checks: they do not depend on the queue database, so they run
    on SQLite only (the database check itself runs on both, below)."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def check(
    tmp_path: Path, db_url: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "check",
        "--data-dir",
        str(tmp_path / "data"),
        "--db-url",
        db_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--min-free-disk",
        "1MiB",
        "--connect-timeout",
        "5s",
        *extra,
        check=False,
        env=env,
        timeout=90,
    )


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``{check name: whole line}``; every stdout line is one check."""
    out = {}
    for line in result.stdout.splitlines():
        status, rest = line[:4].strip(), line[5:]
        assert status in ("ok", "FAIL", "WARN", "skip"), line
        out[rest.split(":", 1)[0]] = line
    return out


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault.service_disabled, "Cloud Healthcare API is not enabled in the project"),
        (Fault.insufficient_scopes, "lack the https://www.googleapis.com/auth/cloud-healthcare"),
        (Fault.iam_denied, "lacks roles/healthcare.dicomEditor on the DICOM store"),
    ],
)
def test_each_403_cause_is_named_with_its_fix(
    tmp_path: Path,
    sqlite_db: str,
    stub: HealthcareStub,
    fault,
    cause: str,  # type: ignore[no-untyped-def]
) -> None:
    stub.script(fault())
    result = check(tmp_path, sqlite_db, "--dicomweb-url", stub.base_url, "--auth", "none")
    assert result.returncode == 1, result.stdout + result.stderr
    found = lines(result)
    assert found["permission"].startswith("FAIL permission: HTTP 403 — ")
    assert cause in found["permission"]
    for name in ("database", "spool", "free-space", "dicom-port", "dns", "connect", "credentials"):
        assert found[name].startswith("ok"), found[name]
    assert "Traceback" not in result.stderr
    # the probe is one GET studies?limit=1
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.query) for r in stub.requests] == [
        ("GET", "studies", {"limit": ["1"]})
    ]


def test_a_healthy_orthanc_passes(tmp_path: Path, db_url: str, orthanc: OrthancServer) -> None:
    result = check(tmp_path, db_url, "--dicomweb-url", orthanc.dicomweb_url)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert found["permission"] == (
        "ok   permission: authenticated request accepted (GET studies?limit=1: HTTP 200)"
    )
    assert found["credentials"].startswith("ok   credentials: none")
    assert found["tls"].startswith("skip tls: plain http to a loopback address")
    assert all(line.startswith(("ok", "skip")) for line in found.values())


def test_unreachable_destinations_are_named_precisely(tmp_path: Path, sqlite_db: str) -> None:
    refused = check(tmp_path, sqlite_db, "--dicomweb-url", f"http://127.0.0.1:{free_port()}/dw")
    assert refused.returncode == 1
    found = lines(refused)
    assert found["connect"].startswith("FAIL connect: TCP 127.0.0.1:")
    assert "connection refused" in found["connect"]
    assert found["permission"] == "skip permission: the destination is not reachable"
    unknown = check(tmp_path, sqlite_db, "--dicomweb-url", "http://no-such-host.invalid/dicomWeb")
    assert unknown.returncode == 1
    found = lines(unknown)
    assert found["dns"].startswith("FAIL dns: cannot resolve no-such-host.invalid")
    assert "— check the host name in --dicomweb-url" in found["dns"]


def test_wrong_path_and_receive_only(tmp_path: Path, sqlite_db: str, stub: HealthcareStub) -> None:
    wrong = stub.base_url.replace("/dicomWeb", "/dicomweb-typo")
    result = check(tmp_path, sqlite_db, "--dicomweb-url", wrong)
    assert result.returncode == 1
    assert "FAIL permission: HTTP 404: no DICOMweb service at" in result.stdout
    receive_only = check(tmp_path, sqlite_db)
    assert receive_only.returncode == 0, receive_only.stdout
    assert "skip destination: no --dicomweb-url given" in receive_only.stdout


def test_the_dicom_port_in_use_is_a_warning(tmp_path: Path, sqlite_db: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = check(tmp_path, sqlite_db, "--port", str(port))
    assert result.returncode == 0, result.stdout
    assert lines(result)["dicom-port"].startswith(
        f"WARN dicom-port: 127.0.0.1:{port} is in use (stowaway already running?) — "
    )


def test_database_at_an_old_schema(tmp_path: Path, db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    engine.dispose()
    result = check(tmp_path, db_url)
    line = lines(result)["database"]
    if db_url.startswith("sqlite"):
        # the embedded database migrates itself at start-up
        assert result.returncode == 0 and line.startswith("ok") and "at start-up" in line
    else:
        assert result.returncode == 1
        assert line.startswith("FAIL database: ") and "run `stowaway migrate`" in line
        assert "password" not in line.lower()
    bad = check(tmp_path, "postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none")
    assert bad.returncode == 1
    line = lines(bad)["database"]
    assert line.startswith("FAIL database: cannot reach postgresql+psycopg://nobody:***@")
    assert "hunter2" not in bad.stdout + bad.stderr


def test_too_little_free_space(tmp_path: Path, sqlite_db: str) -> None:
    result = check(tmp_path, sqlite_db, "--min-free-disk", "1000000GiB")
    assert result.returncode == 1
    assert lines(result)["free-space"].startswith("FAIL free-space: ")
    assert "below the minimum, receipts are refused with 0xA700" in result.stdout


def test_untrusted_tls_then_trusted_with_the_ca_bundle(tmp_path: Path, sqlite_db: str) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server", server=True)
    with HealthcareStub(tls=server.server_context()) as stub:
        assert stub.base_url.startswith("https://")
        untrusted = check(tmp_path, sqlite_db, "--dicomweb-url", stub.base_url)
        assert untrusted.returncode == 1
        found = lines(untrusted)
        assert found["tls"].startswith("FAIL tls: the certificate of 127.0.0.1 is not trusted")
        assert "--ca-bundle" in found["tls"]
        trusted = check(
            tmp_path, sqlite_db, "--dicomweb-url", stub.base_url, "--ca-bundle", str(ca.cert)
        )
        assert trusted.returncode == 0, trusted.stdout
        assert lines(trusted)["tls"].startswith("ok   tls: TLSv1.")


def test_bearer_token_is_used_and_never_printed(
    tmp_path: Path, sqlite_db: str, stub: HealthcareStub
) -> None:
    stub.required_bearer = "s3cr3t-t0ken-value"
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-t0ken-value\n")
    args = ("--dicomweb-url", stub.base_url, "--auth", "bearer")
    result = check(tmp_path, sqlite_db, *args, "--bearer-token-file", str(token_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result)["credentials"] == f"ok   credentials: bearer token read from {token_file}"
    assert "s3cr3t" not in result.stdout + result.stderr
    token_file.write_text("wrong-token")
    rejected = check(tmp_path, sqlite_db, *args, "--bearer-token-file", str(token_file))
    assert rejected.returncode == 1
    assert lines(rejected)["permission"].startswith("FAIL permission: HTTP 401 — ")
    assert "wrong-token" not in rejected.stdout + rejected.stderr
    missing = check(tmp_path, sqlite_db, *args, "--bearer-token-file", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert lines(missing)["credentials"].startswith("FAIL credentials: --auth bearer: ")


def _google_env(tmp_path: Path, metadata: MetadataServer) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GCE_", "GOOGLE_", "CLOUDSDK_")) and k != "NO_GCE_CHECK"
    }
    env.update(metadata.environ())
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")  # no gcloud credentials file
    env["GCE_METADATA_TIMEOUT"] = "2"
    return env


def test_google_credentials_from_the_metadata_server(
    tmp_path: Path, sqlite_db: str, stub: HealthcareStub
) -> None:
    stub.required_bearer = "token-1"
    with MetadataServer() as metadata:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "stowaway.cli",
                "check",
                "--data-dir",
                str(tmp_path / "data"),
                "--db-url",
                sqlite_db,
                "--port",
                str(free_port()),
                "--min-free-disk",
                "1MiB",
                "--dicomweb-url",
                stub.base_url,
                "--auth",
                "google",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=REPO,
            env=_google_env(tmp_path, metadata),
            check=False,
        )
        assert metadata.issued == 1
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert found["credentials"].startswith(
        "ok   credentials: google: access token obtained for service account "
        "stowaway-test@example.invalid"
    )
    assert found["permission"].startswith("ok")
    assert "token-1" not in result.stdout + result.stderr


def test_google_without_credentials_says_how_to_get_them(
    tmp_path: Path, sqlite_db: str, stub: HealthcareStub
) -> None:
    with MetadataServer() as metadata:
        metadata.fail_tokens = True
        env = _google_env(tmp_path, metadata)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "stowaway.cli",
                "check",
                "--data-dir",
                str(tmp_path / "data"),
                "--db-url",
                sqlite_db,
                "--port",
                str(free_port()),
                "--min-free-disk",
                "1MiB",
                "--dicomweb-url",
                stub.base_url,
                "--auth",
                "google",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=REPO,
            env=env,
            check=False,
        )
    assert result.returncode == 1
    found = lines(result)
    assert found["credentials"].startswith("FAIL credentials: google: cannot obtain Google")
    assert found["permission"] == "skip permission: no usable credentials"


def test_check_checks_every_destination_and_names_each(
    tmp_path: Path, sqlite_db: str, orthanc: OrthancServer
) -> None:
    """Several destinations: each one's lines carry its name; a DICOM node is asked for a
    C-ECHO; one that is down fails the check, the others stay ok."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    node = AE(ae_title="PACS")
    node.add_supported_context(Verification)
    node_port, down_port = free_port(), free_port()
    server = node.start_server(("127.0.0.1", node_port), block=False)
    config = tmp_path / "destinations.yaml"
    config.write_text(
        "destinations:\n"
        f"  - {{name: local, kind: dicomweb, url: '{orthanc.dicomweb_url}', auth: none}}\n"
        f"  - {{name: pacs, kind: dimse, host: 127.0.0.1, port: {node_port}, called_aet: PACS}}\n"
        f"  - {{name: gone, kind: dimse, host: 127.0.0.1, port: {down_port}, called_aet: GONE}}\n"
    )
    try:
        result = check(tmp_path, sqlite_db, "--destinations", str(config))
    finally:
        server.shutdown()
    found = lines(result)
    assert found["local/permission"].startswith("ok")
    assert found["pacs/echo"].startswith("ok") and "PACS@127.0.0.1" in found["pacs/echo"]
    assert found["gone/echo"].startswith("FAIL") and "is the node running" in found["gone/echo"]
    assert result.returncode == 1
