"""Authentication: real google-auth against a fake metadata server, bearer/basic files."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from google.oauth2 import credentials as oauth2_credentials

from stowaway.forwarder.auth import (
    HEALTHCARE_SCOPE,
    AuthConfigError,
    AuthKind,
    BasicFileAuth,
    BearerTokenFileAuth,
    CredentialsError,
    GoogleAuth,
    build_auth,
    default_auth_kind,
)
from stowaway.forwarder.outcome import OutcomeKind
from stowaway.forwarder.stow import StowClient
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub
from tests.support.metadata_server import MetadataServer

K = OutcomeKind
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def _oauth2(token: str | None) -> oauth2_credentials.Credentials:
    """Real google-auth user credentials holding ``token`` (no refresh possible)."""
    return oauth2_credentials.Credentials(token=token)  # type: ignore[no-untyped-call]


def _write(path: Path, text: str | bytes) -> Path:
    """Write and force a visibly new mtime (coarse file systems tick slowly)."""
    data = text.encode() if isinstance(text, str) else text
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(data)
    if path.stat().st_mtime_ns == old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))
    return path


# ------------------------------------------------------------------ kinds and config


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (
            "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/"
            "dicomStores/s/dicomWeb",
            AuthKind.GOOGLE,
        ),
        ("https://HEALTHCARE.googleapis.com:443/v1beta1/x", AuthKind.GOOGLE),
        ("https://us-central1-healthcare.googleapis.com/v1/x", AuthKind.GOOGLE),
        ("http://orthanc:8042/dicom-web", AuthKind.NONE),
        ("https://pacs.example.org/dcm4chee-arc/aets/DCM4CHEE/rs", AuthKind.NONE),
        ("https://storage.googleapis.com/bucket", AuthKind.NONE),
        ("https://healthcare.googleapis.com.evil.example/x", AuthKind.NONE),
    ],
)
def test_default_auth_kind(url: str, kind: AuthKind) -> None:
    assert default_auth_kind(url) is kind


def test_build_auth_none() -> None:
    assert build_auth(AuthKind.NONE) is None
    assert build_auth("none") is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": AuthKind.BEARER}, "bearer_token_file"),
        ({"kind": AuthKind.BASIC, "basic_password_file": Path("/nonexistent")}, "basic_user"),
        ({"kind": AuthKind.BASIC, "basic_user": "orthanc"}, "basic_password_file"),
        ({"kind": AuthKind.NONE, "bearer_token_file": Path("/x")}, "only used with bearer"),
        (
            {"kind": AuthKind.BEARER, "bearer_token_file": Path("/x"), "basic_user": "u"},
            "only used with basic",
        ),
        (
            {"kind": AuthKind.BEARER, "bearer_token_file": Path("/nonexistent/token")},
            "cannot read the bearer token file",
        ),
        (
            {
                "kind": AuthKind.BASIC,
                "basic_user": "u",
                "basic_password_file": Path("/nonexistent/pw"),
            },
            "cannot read the basic auth password",
        ),
    ],
)
def test_build_auth_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(AuthConfigError, match=match) as info:
        build_auth(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_empty_token_file_is_a_config_error(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", " \n")
    with pytest.raises(AuthConfigError, match="empty"):
        build_auth(AuthKind.BEARER, bearer_token_file=token)


# ------------------------------------------------------------------ bearer


def test_bearer_token_file_and_rotation(stub: HealthcareStub, tmp_path: Path) -> None:
    token = _write(tmp_path / "token", "  first-token\n")
    auth = build_auth(AuthKind.BEARER, bearer_token_file=token)
    assert isinstance(auth, BearerTokenFileAuth)
    stub.required_bearer = "first-token"
    with StowClient(stub.base_url, auth) as client:
        assert client.probe().kind is K.SUCCESS
        _write(token, "second-token-longer\n")
        stub.required_bearer = "second-token-longer"
        assert client.probe().kind is K.SUCCESS
        # Same size, new content: the mtime tells it apart.
        _write(token, "third-token-longer!\n")
        stub.required_bearer = "third-token-longer!"
        assert client.probe().kind is K.SUCCESS
    assert stub.authorizations() == [
        "Bearer first-token",
        "Bearer second-token-longer",
        "Bearer third-token-longer!",
    ]


def test_bearer_kubernetes_symlink_rotation(stub: HealthcareStub, tmp_path: Path) -> None:
    # A mounted secret: token -> ..data/token, ..data -> ..2024_01; rotation swaps ..data.
    for version, value in (("..v1", "k8s-token-1"), ("..v2", "k8s-token-2")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "token").write_text(value + "\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "token").symlink_to("..data/token")
    auth = BearerTokenFileAuth(tmp_path / "token")
    with StowClient(stub.base_url, auth) as client:
        client.probe()
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        client.probe()
    assert stub.authorizations() == ["Bearer k8s-token-1", "Bearer k8s-token-2"]


def test_bearer_keeps_the_last_token_while_the_file_is_gone(
    stub: HealthcareStub, tmp_path: Path
) -> None:
    token = _write(tmp_path / "token", "kept-token")
    with StowClient(stub.base_url, BearerTokenFileAuth(token)) as client:
        client.probe()
        token.unlink()
        client.probe()
        _write(token, "")  # empty mid-rotation
        client.probe()
    assert stub.authorizations() == ["Bearer kept-token"] * 3


def test_unreadable_token_is_blocked_without_leaking(stub: HealthcareStub, tmp_path: Path) -> None:
    token = _write(tmp_path / "token", b"\xffSECRET-PART\xfe")
    auth = BearerTokenFileAuth(token)
    with pytest.raises(CredentialsError, match="not UTF-8") as info:
        auth(requests.Request("GET", "http://127.0.0.1/").prepare())
    assert "SECRET" not in str(info.value)
    with StowClient(stub.base_url, auth) as client:
        out = client.probe()
    assert out.kind is K.BLOCKED and "bearer token file" in out.detail
    assert "SECRET" not in out.detail
    assert not stub.requests  # nothing was sent without credentials


def test_missing_token_file_at_request_time_is_blocked(
    stub: HealthcareStub, tmp_path: Path
) -> None:
    with StowClient(stub.base_url, BearerTokenFileAuth(tmp_path / "absent")) as client:
        out = client.probe()
    assert out.kind is K.BLOCKED and "cannot read bearer token file" in out.detail


# ------------------------------------------------------------------ basic


def test_basic_auth(stub: HealthcareStub, tmp_path: Path) -> None:
    password = _write(tmp_path / "password", " pass word \n")
    auth = build_auth(AuthKind.BASIC, basic_user="orthanc", basic_password_file=password)
    assert isinstance(auth, BasicFileAuth)
    with StowClient(stub.base_url, auth) as client:
        assert client.probe().kind is K.SUCCESS
        _write(password, "rotated")
        client.probe()
    expected = [
        "Basic " + base64.b64encode(b"orthanc: pass word ").decode(),
        "Basic " + base64.b64encode(b"orthanc:rotated").decode(),
    ]
    assert stub.authorizations() == expected


# ------------------------------------------------------------------ repr hides secrets


def test_reprs_hide_secrets(tmp_path: Path) -> None:
    token = _write(tmp_path / "token", "TOKEN-VALUE")
    password = _write(tmp_path / "password", "PASSWORD-VALUE")
    bearer = BearerTokenFileAuth(token)
    basic = BasicFileAuth("orthanc", password)
    google = GoogleAuth(_oauth2(token="GOOGLE-TOKEN-VALUE"))
    request = requests.Request("GET", "http://127.0.0.1/").prepare()
    for auth in (bearer, basic, google):
        auth(request)  # loaded: the secret is in memory now
        text = repr(auth) + str(auth) + repr(vars(auth).keys())
        for secret in ("TOKEN-VALUE", "PASSWORD-VALUE", "GOOGLE-TOKEN-VALUE"):
            assert secret not in text
    assert str(token) in repr(bearer) and "orthanc" in repr(basic)
    assert repr(google) == "GoogleAuth(credentials=Credentials)"


# ------------------------------------------------------------------ Google (in process)


def test_google_auth_with_valid_credentials(stub: HealthcareStub) -> None:
    auth = GoogleAuth(_oauth2(token="static-token"))
    with StowClient(stub.base_url, auth) as client:
        assert client.probe().kind is K.SUCCESS
    auth.close()
    assert stub.authorizations() == ["Bearer static-token"]


def test_google_refresh_failure_is_blocked(stub: HealthcareStub) -> None:
    # No token and nothing to refresh with: google-auth raises RefreshError.
    auth = GoogleAuth(_oauth2(token=None))
    with StowClient(stub.base_url, auth) as client:
        out = client.probe()
    auth.close()
    assert out.kind is K.BLOCKED
    assert out.detail.startswith("cannot obtain Google credentials: ")
    assert not stub.requests


# ------------------------------------------------------------------ Google (metadata server)

# google-auth reads GCE_METADATA_HOST when google.auth.compute_engine._metadata is first
# imported, so the code under test runs in a fresh interpreter with the environment set.
_GCE_SCRIPT = """
import json, sys
from stowaway.forwarder.auth import AuthKind, CredentialsError, build_auth
from stowaway.forwarder.stow import StowClient
try:
    auth = build_auth(AuthKind.GOOGLE)
except CredentialsError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
    sys.exit(0)
with StowClient(sys.argv[1], auth) as client:
    outcomes = [client.probe() for _ in range(int(sys.argv[2]))]
auth.close()
print(json.dumps({"repr": repr(auth),
                  "outcomes": [{"kind": o.kind, "detail": o.detail} for o in outcomes]}))
"""


# Uploads one instance (argv[2]) with Google credentials and reports the outcome.
_GCE_STORE_SCRIPT = """
import json, sys
from pathlib import Path
from stowaway.forwarder.auth import AuthKind, build_auth
from stowaway.forwarder.stow import StowClient, UploadItem
base, path, sop, study, series = sys.argv[1:6]
auth = build_auth(AuthKind.GOOGLE)
with StowClient(base, auth) as client:
    item = UploadItem(sop, study, series, Path(path), Path(path).stat().st_size)
    outcome = client.store([item])[sop]
auth.close()
print(json.dumps({"outcomes": [{"kind": outcome.kind, "detail": outcome.detail}]}))
"""


def _run_gce(
    tmp_path: Path, env: dict[str, str], *args: str, script: str = _GCE_SCRIPT
) -> dict[str, object]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GCE_", "GOOGLE_", "CLOUDSDK_")) and k != "NO_GCE_CHECK"
    }
    clean.update(
        {
            "PYTHONPATH": str(REPO),
            # No gcloud application-default file may be found instead of the metadata server.
            "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
            "GCE_METADATA_TIMEOUT": "2",
            **env,
        }
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=clean,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_google_adc_from_metadata_server_refreshes_before_expiry(
    stub: HealthcareStub, tmp_path: Path
) -> None:
    # token-1 lives 60 s: inside google-auth's refresh threshold (3 min 45 s), so the
    # credentials count as expired at once and the next request refreshes to token-2.
    with MetadataServer(expires_in=[60, 3600]) as metadata:
        report = _run_gce(tmp_path, metadata.environ(), stub.base_url, "3")
        token_requests = metadata.token_requests()
    assert report["outcomes"] == [{"kind": "success", "detail": "HTTP 200"}] * 3
    assert stub.authorizations() == ["Bearer token-1", "Bearer token-2", "Bearer token-2"]
    assert len(token_requests) == 2
    for req in token_requests:
        assert req.flavor == "Google"
        assert req.query.get("scopes") == [HEALTHCARE_SCOPE]
    assert "token-" not in str(report["repr"])


def test_a_401_to_an_unexpired_google_token_refreshes_it_and_delivers(
    stub: HealthcareStub, tmp_path: Path
) -> None:
    """A token revoked or rotated early: refreshed on the 401, not an hour later."""
    path = make_ct(tmp_path / "ct.dcm", seed=5)
    uids = read_uids(path)
    stub.required_bearer = "token-2"  # token-1 (valid for an hour) is refused
    with MetadataServer(expires_in=[3600]) as metadata:
        report = _run_gce(
            tmp_path,
            metadata.environ(),
            stub.base_url,
            str(path),
            uids.sop_uid,
            uids.study_uid,
            uids.series_uid,
            script=_GCE_STORE_SCRIPT,
        )
        issued = metadata.issued
    assert report["outcomes"] == [{"kind": "success", "detail": "stored (HTTP 200)"}]
    assert stub.authorizations() == ["Bearer token-1", "Bearer token-2"]
    assert stub.stored[uids.sop_uid] == path.read_bytes()  # the body was sent again whole
    assert issued == 2


def test_a_401_to_a_fresh_google_token_blocks_after_one_refresh(
    stub: HealthcareStub, tmp_path: Path
) -> None:
    stub.required_bearer = "never-issued"
    with MetadataServer(expires_in=[3600]) as metadata:
        report = _run_gce(tmp_path, metadata.environ(), stub.base_url, "1")
        issued = metadata.issued
    outcomes = report["outcomes"]
    assert isinstance(outcomes, list) and outcomes[0]["kind"] == "blocked"
    assert stub.authorizations() == ["Bearer token-1", "Bearer token-2"]
    assert issued == 2


def test_google_metadata_token_failure_is_blocked(stub: HealthcareStub, tmp_path: Path) -> None:
    with MetadataServer() as metadata:
        metadata.fail_tokens = True
        report = _run_gce(tmp_path, metadata.environ(), stub.base_url, "1")
    outcomes = report["outcomes"]
    assert isinstance(outcomes, list)
    assert outcomes[0]["kind"] == "blocked"
    assert outcomes[0]["detail"].startswith("cannot obtain Google credentials: ")
    assert not stub.requests


def test_no_google_credentials_at_all(tmp_path: Path) -> None:
    report = _run_gce(tmp_path, {"NO_GCE_CHECK": "true"}, "http://127.0.0.1:9/", "1")
    assert report["type"] == "CredentialsError"
    error = str(report["error"])
    assert error.startswith("cannot obtain Google credentials: ")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in error and "Workload Identity" in error
