"""HTTPS to the destination: certificates are always verified; nothing turns that off.

The Healthcare API stub serves HTTPS with a certificate from a throw-away CA. With
that CA as ``--ca-bundle`` instances go through; trusting anything else (the system
store, another CA, or the environment variables that make ``requests`` skip
verification elsewhere) leaves them pending, unsent, with the reason logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stowaway.cli import build_parser
from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.models import Status
from stowaway.db.queue import Queue
from tests.conftest import StowawayFactory
from tests.support.certs import TestCA
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct, read_uids
from tests.support.healthcare_stub import HealthcareStub
from tests.support.seeding import seed_queue, wait_until

pytestmark = pytest.mark.timeout(120)

FAST = ("--poll-interval", "50ms", "--backoff-initial", "200ms", "--backoff-max", "500ms")


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def stub(ca: TestCA) -> Iterator[HealthcareStub]:
    with HealthcareStub(tls=ca.issue("server", server=True).server_context()) as s:
        yield s


def statuses(db_url: str) -> list[Status]:
    engine = make_engine(db_url)
    try:
        return [row.status for row in Queue(engine).rows()]
    finally:
        engine.dispose()


def test_a_custom_ca_bundle_verifies_the_destination(
    stowaway: StowawayFactory, stub: HealthcareStub, ca: TestCA, db_url: str, tmp_path: Path
) -> None:
    ct = make_ct(tmp_path / "ct.dcm")
    seed_queue(db_url, tmp_path / "data", [ct])
    # The environment's CA bundle (another CA) does not replace --ca-bundle.
    other = TestCA(tmp_path / "other", "other-ca")
    proc = stowaway(
        "forward",
        *("--dicomweb-url", stub.base_url, "--ca-bundle", str(ca.cert), *FAST),
        env={"REQUESTS_CA_BUNDLE": str(other.cert), "CURL_CA_BUNDLE": str(other.cert)},
    )
    wait_until(lambda: statuses(db_url) == [Status.DONE], timeout=60)
    assert read_uids(ct).sop_uid in stub.stored
    assert proc.stop() == 0


@pytest.mark.parametrize(
    ("trust", "env"),
    [
        # The system trust store, with the variables that disable verification in
        # some tools set to empty.
        ("system", {"CURL_CA_BUNDLE": "", "REQUESTS_CA_BUNDLE": ""}),
        # --ca-bundle of another CA; the environment's bundle (the right CA) does not
        # replace it.
        ("other CA", {"REQUESTS_CA_BUNDLE": "{right}"}),
    ],
)
def test_an_untrusted_destination_gets_nothing(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ca: TestCA,
    db_url: str,
    tmp_path: Path,
    trust: str,
    env: dict[str, str],
) -> None:
    other = TestCA(tmp_path / "other", "other-ca")
    seed_queue(db_url, tmp_path / "data", [make_ct(tmp_path / "ct.dcm")])
    args = ["--dicomweb-url", stub.base_url, *FAST]
    if trust == "other CA":
        args += ["--ca-bundle", str(other.cert)]
    environ = {k: v.format(right=ca.cert) for k, v in env.items()}
    proc = stowaway("forward", *args, env=environ)
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in proc.log(), timeout=60)
    assert proc.stop() == 0
    assert stub.stored == {}
    assert not any(r.method == "POST" for r in stub.requests)  # no request got through TLS
    assert statuses(db_url) == [Status.PENDING]  # waits for the operator's fix, not lost


def test_no_option_disables_verification(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "forward", "check"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        help_text = capsys.readouterr().out.lower()
        assert "--ca-bundle" in help_text
        for word in ("insecure", "no-verify", "skip-verify", "verify-ssl", "tls-verify"):
            assert word not in help_text, f"stowaway {command} --help offers {word}"
