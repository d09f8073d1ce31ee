"""The STOW-RS client against the local Healthcare API stub, over real loopback HTTP."""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import io
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowaway.forwarder.outcome import OutcomeKind
from stowaway.forwarder.stow import CHUNK_SIZE, MultipartBody, StowClient, UploadItem
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import (
    FAILURE_DETAIL_DUPLICATE,
    Fault,
    HealthcareStub,
    parse_multipart,
)

K = OutcomeKind
REPO = Path(__file__).resolve().parents[3]


def item_for(path: Path) -> UploadItem:
    uids = read_uids(path)
    return UploadItem(uids.sop_uid, uids.study_uid, uids.series_uid, path, path.stat().st_size)


def make_items(directory: Path, n: int, seed: int = 0, **kw: object) -> list[UploadItem]:
    return [
        item_for(make_ct(directory / f"ct-{seed}-{i}.dcm", seed=seed, instance_number=i + 1, **kw))  # type: ignore[arg-type]
        for i in range(n)
    ]


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


@pytest.fixture
def client(stub: HealthcareStub) -> Iterator[StowClient]:
    with StowClient(stub.base_url, connect_timeout=2, read_timeout=2) as c:
        yield c


@pytest.fixture
def items(tmp_path: Path) -> list[UploadItem]:
    return make_items(tmp_path, 3)


# ------------------------------------------------------------------ the body


def test_multipart_body_streams_exactly_the_files(tmp_path: Path) -> None:
    files = [os.urandom(n) for n in (0, 1, CHUNK_SIZE + 7, 3)]
    handles = [io.BytesIO(data) for data in files]
    body = MultipartBody("b0undary", [(h, len(d)) for h, d in zip(handles, files, strict=True)])
    expected = (
        b"".join(
            (b"" if i == 0 else b"\r\n")
            + b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
            + d
            for i, d in enumerate(files)
        )
        + b"\r\n--b0undary--\r\n"
    )
    assert len(body) == len(expected)
    chunks = []
    while chunk := body.read(1000):
        assert len(chunk) <= 1000
        chunks.append(chunk)
    assert b"".join(chunks) == expected
    parts = parse_multipart(expected, b"b0undary")
    assert [content for _, content in parts] == files
    assert {h["content-type"] for h, _ in parts} == {"application/dicom"}


def test_multipart_body_refuses_to_send_a_short_file() -> None:
    body = MultipartBody("b", [(io.BytesIO(b"abc"), 10)])
    with pytest.raises(OSError, match="shrank"):
        while body.read(4):
            pass


# ------------------------------------------------------------------ storing


def test_store_one_instance(stub: HealthcareStub, client: StowClient, tmp_path: Path) -> None:
    (item,) = make_items(tmp_path, 1)
    out = client.store([item])
    assert out == {item.sop_instance_uid: out[item.sop_instance_uid]}
    assert out[item.sop_instance_uid].kind is K.SUCCESS
    assert out[item.sop_instance_uid].http_status == 200
    assert stub.stored[item.sop_instance_uid] == item.path.read_bytes()

    (req,) = stub.requests
    assert req.method == "POST"
    assert req.path == stub.path_prefix + "/studies"
    content_type = req.header("Content-Type") or ""
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert req.header("Accept") == "application/dicom+json"
    assert req.header("Content-Length") == str(req.body_size)
    assert req.header("Transfer-Encoding") is None  # a Content-Length, not chunked
    assert (req.header("User-Agent") or "").startswith("stowaway/")
    assert req.header("Authorization") is None
    assert req.part_count == 1


def test_store_a_batch_of_three(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem]
) -> None:
    out = client.store(items)
    assert list(out) == [i.sop_instance_uid for i in items]
    assert {o.kind for o in out.values()} == {K.SUCCESS}
    assert stub.requests[-1].part_count == 3
    for item in items:
        assert stub.stored[item.sop_instance_uid] == item.path.read_bytes()


def test_identical_reupload_succeeds_and_different_bytes_conflict(
    stub: HealthcareStub, client: StowClient, tmp_path: Path
) -> None:
    (item,) = make_items(tmp_path, 1)
    original = item.path.read_bytes()
    assert client.store([item])[item.sop_instance_uid].kind is K.SUCCESS
    assert client.store([item])[item.sop_instance_uid].kind is K.SUCCESS

    other = tmp_path / "other.dcm"
    make_ct(other, seed=0, instance_number=1, patient_name="Other^Bytes")
    changed = item_for(other)
    assert changed.sop_instance_uid == item.sop_instance_uid
    out = client.store([changed])[item.sop_instance_uid]
    assert out.kind is K.CONFLICT
    assert out.http_status == 409
    assert "0x0111" in out.detail and FAILURE_DETAIL_DUPLICATE in out.detail
    assert stub.stored[item.sop_instance_uid] == original


def test_partial_conflict_in_a_batch(
    stub: HealthcareStub, client: StowClient, tmp_path: Path
) -> None:
    first = make_items(tmp_path / "a", 1)[0]
    client.store([first])
    make_ct(tmp_path / "changed.dcm", seed=0, instance_number=1, patient_id="OTHER")
    changed = item_for(tmp_path / "changed.dcm")
    fresh = make_items(tmp_path / "b", 1, seed=5)[0]
    out = client.store([changed, fresh])
    assert out[changed.sop_instance_uid].kind is K.CONFLICT
    assert out[fresh.sop_instance_uid].kind is K.SUCCESS
    assert out[fresh.sop_instance_uid].http_status == 202


def test_missing_file_is_permanent_and_the_rest_is_sent(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem]
) -> None:
    items[1].path.unlink()
    out = client.store(items)
    assert out[items[1].sop_instance_uid].kind is K.PERMANENT
    assert "cannot read spool file" in out[items[1].sop_instance_uid].detail
    assert out[items[0].sop_instance_uid].kind is K.SUCCESS
    assert out[items[2].sop_instance_uid].kind is K.SUCCESS
    assert stub.requests[-1].part_count == 2


def test_programmer_errors_raise(client: StowClient, items: list[UploadItem]) -> None:
    assert client.store([]) == {}
    with pytest.raises(ValueError, match="duplicate"):
        client.store([items[0], items[0]])
    for bad in ("ftp://x/dicomWeb", "not a url", "https://user:pw@host/dicomWeb"):
        with pytest.raises(ValueError):
            StowClient(bad)
    with pytest.raises(ValueError):
        StowClient("http://127.0.0.1/", read_timeout=0)


@pytest.mark.parametrize("suffix", ["", "/", "//"])
def test_base_url_is_normalised(stub: HealthcareStub, tmp_path: Path, suffix: str) -> None:
    (item,) = make_items(tmp_path, 1)
    with StowClient(stub.base_url + suffix) as c:
        assert c.base_url == stub.base_url
        assert c.store([item])[item.sop_instance_uid].kind is K.SUCCESS
    assert stub.requests[-1].path == stub.path_prefix + "/studies"


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize(
    ("fault", "kind", "in_detail", "retry_after"),
    [
        (Fault.http(503, retry_after="3"), K.TRANSIENT, "HTTP 503", 3.0),
        (Fault.http(429, retry_after="11"), K.TRANSIENT, "HTTP 429", 11.0),
        (Fault.http(500), K.TRANSIENT, "HTTP 500", None),
        (
            Fault.http(502, body="Bad Gateway", content_type="text/html"),
            K.TRANSIENT,
            "Bad Gateway",
            None,
        ),
        (Fault.http(504), K.TRANSIENT, "HTTP 504", None),
        (Fault.http(408), K.TRANSIENT, "HTTP 408", None),
        (Fault.service_disabled(), K.BLOCKED, "enable healthcare.googleapis.com", None),
        (
            Fault.insufficient_scopes(),
            K.BLOCKED,
            "--scopes=https://www.googleapis.com/auth/cloud-healthcare",
            None,
        ),
        (Fault.iam_denied(), K.BLOCKED, "roles/healthcare.dicomEditor", None),
        (
            Fault.google_error(400, "INVALID_ARGUMENT", "invalid multipart"),
            K.PERMANENT,
            "invalid multipart",
            None,
        ),
        (
            Fault.http(413, body="too large", content_type="text/plain"),
            K.PERMANENT,
            "too large",
            None,
        ),
        (Fault.http(301), K.PERMANENT, "HTTP 301", None),
    ],
)
def test_http_faults(
    stub: HealthcareStub,
    client: StowClient,
    items: list[UploadItem],
    fault: Fault,
    kind: OutcomeKind,
    in_detail: str,
    retry_after: float | None,
) -> None:
    stub.script(fault)
    out = client.store(items)
    assert {o.kind for o in out.values()} == {kind}
    for outcome in out.values():
        assert in_detail in outcome.detail
        assert outcome.retry_after == retry_after
    assert not stub.stored
    # The fault is spent; the next attempt goes through on the same pooled session.
    assert {o.kind for o in client.store(items).values()} == {K.SUCCESS}


def test_503_three_times_then_normal(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem]
) -> None:
    stub.script(Fault.http(503, times=3, retry_after="1"))
    kinds = [client.store(items)[items[0].sop_instance_uid].kind for _ in range(4)]
    assert kinds == [K.TRANSIENT, K.TRANSIENT, K.TRANSIENT, K.SUCCESS]
    assert stub.pending_faults() == 0


@pytest.mark.parametrize("read_bytes", [0, 1000, None])
def test_connection_reset(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem], read_bytes: int | None
) -> None:
    stub.script(Fault.reset(read_bytes=read_bytes))
    out = client.store(items)
    assert {o.kind for o in out.values()} == {K.TRANSIENT}
    detail = out[items[0].sop_instance_uid].detail
    assert detail.startswith(("connection reset", "connection closed")), detail
    assert not stub.stored
    assert {o.kind for o in client.store(items).values()} == {K.SUCCESS}


def test_reset_in_the_middle_of_a_large_body(
    stub: HealthcareStub, client: StowClient, tmp_path: Path
) -> None:
    (item,) = make_items(tmp_path, 1, rows=1024, cols=1024)  # 2 MiB
    stub.script(Fault.reset(read_bytes=100_000))
    assert client.store([item])[item.sop_instance_uid].kind is K.TRANSIENT
    assert client.store([item])[item.sop_instance_uid].kind is K.SUCCESS


def test_accept_then_drop_then_retry_is_idempotent(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem]
) -> None:
    stub.script(Fault.accept_then_drop())
    out = client.store(items)
    assert {o.kind for o in out.values()} == {K.TRANSIENT}
    assert set(stub.stored) == {i.sop_instance_uid for i in items}  # stored, not answered
    assert {o.kind for o in client.store(items).values()} == {K.SUCCESS}


def test_read_timeout_is_honoured(stub: HealthcareStub, tmp_path: Path) -> None:
    (item,) = make_items(tmp_path, 1)
    stub.script(Fault.slow(3.0))
    with StowClient(stub.base_url, read_timeout=0.5) as c:
        started = time.monotonic()
        out = c.store([item])[item.sop_instance_uid]
        elapsed = time.monotonic() - started
    assert out.kind is K.TRANSIENT and out.detail.startswith("read timeout")
    assert 0.4 <= elapsed < 2.0


def test_slow_but_within_the_timeout_succeeds(stub: HealthcareStub, tmp_path: Path) -> None:
    (item,) = make_items(tmp_path, 1)
    stub.script(Fault.slow(0.3))
    with StowClient(stub.base_url, read_timeout=2) as c:
        assert c.store([item])[item.sop_instance_uid].kind is K.SUCCESS


@pytest.mark.parametrize(("reason", "kind"), [(0xA700, K.TRANSIENT), (0xC000, K.CONFLICT)])
def test_202_with_one_failed_instance(
    stub: HealthcareStub,
    client: StowClient,
    items: list[UploadItem],
    reason: int,
    kind: OutcomeKind,
) -> None:
    failing = items[1].sop_instance_uid
    stub.script(Fault.partial_failure(failing, reason=reason))
    out = client.store(items)
    assert out[failing].kind is kind
    assert out[failing].http_status == 202
    assert f"0x{reason:04X}" in out[failing].detail
    for item in (items[0], items[2]):
        assert out[item.sop_instance_uid].kind is K.SUCCESS
    assert failing not in stub.stored


def test_required_bearer_token_missing_is_blocked(
    stub: HealthcareStub, client: StowClient, items: list[UploadItem]
) -> None:
    stub.required_bearer = "the-token"
    out = client.store(items)
    assert {o.kind for o in out.values()} == {K.BLOCKED}
    assert "Http_401, UNAUTHENTICATED" in out[items[0].sop_instance_uid].detail
    assert client.probe().kind is K.BLOCKED


def test_connection_refused_is_transient(items: list[UploadItem]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with StowClient(f"http://127.0.0.1:{port}/dicomWeb", connect_timeout=2) as c:
        out = c.store(items)
        assert {o.kind for o in out.values()} == {K.TRANSIENT}
        assert out[items[0].sop_instance_uid].detail.startswith("connection refused")
        assert c.probe().kind is K.TRANSIENT
        assert c.delete_instance("1", "2", "3").kind is K.TRANSIENT


# ------------------------------------------------------------------ probe and delete


def test_probe(stub: HealthcareStub, client: StowClient) -> None:
    out = client.probe()
    assert out.kind is K.SUCCESS and out.http_status == 200
    req = stub.requests[-1]
    assert (req.method, req.path, req.query) == (
        "GET",
        stub.path_prefix + "/studies",
        {"limit": ["1"]},
    )
    assert req.header("Accept") == "application/dicom+json"
    stub.script(Fault.iam_denied())
    blocked = client.probe()
    assert blocked.kind is K.BLOCKED and "roles/healthcare.dicomEditor" in blocked.detail
    stub.script(Fault.http(503, retry_after="4"))
    assert client.probe().retry_after == 4.0
    assert client.probe().kind is K.SUCCESS


def test_delete_instance(stub: HealthcareStub, client: StowClient, tmp_path: Path) -> None:
    (item,) = make_items(tmp_path, 1)
    client.store([item])
    args = (item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
    out = client.delete_instance(*args)
    assert out.kind is K.SUCCESS and out.http_status == 200
    assert not stub.stored
    req = stub.requests[-1]
    assert req.method == "DELETE"
    assert req.path == (
        f"{stub.path_prefix}/studies/{args[0]}/series/{args[1]}/instances/{args[2]}"
    )
    again = client.delete_instance(*args)
    assert again.kind is K.SUCCESS and again.http_status == 404
    stub.script(Fault.http(500))
    assert client.delete_instance(*args).kind is K.TRANSIENT
    stub.script(Fault.service_disabled())
    assert client.delete_instance(*args).kind is K.BLOCKED


def test_overwrite_flow_delete_then_store(
    stub: HealthcareStub, client: StowClient, tmp_path: Path
) -> None:
    (item,) = make_items(tmp_path / "a", 1)
    client.store([item])
    make_ct(tmp_path / "new.dcm", seed=0, instance_number=1, patient_name="New^Version")
    changed = item_for(tmp_path / "new.dcm")
    assert client.store([changed])[changed.sop_instance_uid].kind is K.CONFLICT
    uids = (changed.study_instance_uid, changed.series_instance_uid, changed.sop_instance_uid)
    assert client.delete_instance(*uids).kind is K.SUCCESS
    assert client.store([changed])[changed.sop_instance_uid].kind is K.SUCCESS
    assert stub.stored[changed.sop_instance_uid] == changed.path.read_bytes()


# ------------------------------------------------------------------ streaming memory

_MEMORY_SCRIPT = """
import json, pathlib, re, sys, tracemalloc
from stowaway.forwarder.stow import StowClient, UploadItem

def peak_rss():
    # VmHWM, not ru_maxrss: the latter keeps the peak of the forked parent across exec.
    status = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

base, path, sop, study, series = sys.argv[1:6]
p = pathlib.Path(path)
item = UploadItem(sop, study, series, p, p.stat().st_size)
with StowClient(base) as client:
    assert client.probe().kind == "success"  # imports and connection warmed up
    rss_before = peak_rss()
    tracemalloc.start()
    outcome = client.store([item])[sop]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = peak_rss()
print(json.dumps({"kind": outcome.kind, "detail": outcome.detail, "traced_peak": peak,
                  "peak_rss_growth": rss_after - rss_before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streamed_upload_of_50_mb_stays_small(stub: HealthcareStub, tmp_path: Path) -> None:
    path = make_ct(tmp_path / "big.dcm", rows=5000, cols=5000)  # 50 MB of pixels
    size = path.stat().st_size
    assert size > 50_000_000
    uids = read_uids(path)
    # A fresh interpreter measures only the client: the stub here holds the 50 MB it got.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            stub.base_url,
            str(path),
            uids.sop_uid,
            uids.study_uid,
            uids.series_uid,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "success", report
    # Python allocations during the upload and the growth of the peak RSS: far below the
    # 50 MB a whole-file read would cost.
    assert report["traced_peak"] < 20 * 2**20, report
    assert report["peak_rss_growth"] < 20 * 2**20, report
    digest = hashlib.sha256(stub.stored[uids.sop_uid]).hexdigest()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stub.requests[-1].header("Content-Length") == str(stub.requests[-1].body_size)
    assert stub.requests[-1].body_size > size


# ------------------------------------------------------------------ TLS


def test_no_way_to_disable_tls_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    params = inspect.signature(StowClient).parameters
    assert "verify" not in params and not any("insecure" in p for p in params)
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    with StowClient("https://127.0.0.1:1/dicomWeb") as c:
        assert c.verify is True


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stowaway test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_untrusted_certificate_is_blocked_and_ca_bundle_works(
    tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert_path, key_path = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    (item,) = make_items(tmp_path, 1)
    with HealthcareStub(tls=context) as stub:
        assert stub.base_url.startswith("https://127.0.0.1:")
        with StowClient(stub.base_url, connect_timeout=2, read_timeout=2) as c:
            out = c.store([item])[item.sop_instance_uid]
            assert out.kind is K.BLOCKED and "not trusted" in out.detail
            assert c.probe().kind is K.BLOCKED
        assert not stub.stored
        with StowClient(stub.base_url, ca_bundle=str(cert_path)) as c:
            assert c.verify == str(cert_path)
            assert c.store([item])[item.sop_instance_uid].kind is K.SUCCESS
    with pytest.raises(ValueError, match="ca_bundle"):
        StowClient("https://127.0.0.1/dicomWeb", ca_bundle=str(tmp_path / "missing.pem"))
