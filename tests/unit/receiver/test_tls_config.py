"""The receiver's TLS settings: checked at start-up, one line naming the flag."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from stowaway.cli import build_parser
from stowaway.receiver.tls import TLSConfigError, server_context
from stowaway.settings import SettingsError, load_settings
from tests.support.certs import Issued, TestCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA(d)
    server = ca.issue("server", server=True)
    other: Issued = ca.issue("other", server=True)
    encrypted = ca.issue("encrypted", server=True, password=b"hunter2")
    (d / "garbage.pem").write_text("not a certificate\n")
    return {
        "ca": ca.cert,
        "cert": server.cert,
        "key": server.key,
        "other_key": other.key,
        "enc_cert": encrypted.cert,
        "enc_key": encrypted.key,
        "garbage": d / "garbage.pem",
        "missing": d / "missing.pem",
        "dir": d,
    }


def settings_for(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_settings(build_parser().parse_args(argv), env or {})


def test_context_is_tls12_or_later_and_requires_client_certs_with_a_ca(
    pki: dict[str, Path],
) -> None:
    context = server_context(pki["cert"], pki["key"], pki["ca"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert server_context(pki["cert"], pki["key"]).verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("missing", "key", None, "--tls-cert: {missing} does not exist"),
        ("cert", "missing", None, "--tls-key: {missing} does not exist"),
        ("dir", "key", None, "--tls-cert: {dir} is a directory, not a file"),
        ("garbage", "key", None, "--tls-cert: {garbage} is not a PEM certificate"),
        ("cert", "garbage", None, "--tls-key: {garbage} is not a PEM private key"),
        ("cert", "other_key", None, "--tls-key: {other_key} does not match the certificate"),
        ("enc_cert", "enc_key", None, "--tls-key: {enc_key} is encrypted"),
        ("cert", "key", "garbage", "--tls-ca: {garbage} is not a PEM CA bundle"),
        ("cert", "key", "missing", "--tls-ca: {missing} does not exist"),
    ],
)
def test_unusable_files_name_the_flag(
    pki: dict[str, Path], cert: str, key: str, ca: str | None, message: str
) -> None:
    expected = message.format(**{k: str(v) for k, v in pki.items()})
    with pytest.raises(TLSConfigError) as raised:
        server_context(pki[cert], pki[key], pki[ca] if ca else None)
    assert str(raised.value).startswith(expected)
    assert "\n" not in str(raised.value)


def test_settings(pki: dict[str, Path]) -> None:
    s = settings_for(
        [
            "receive",
            "--tls-port",
            "2762",
            "--tls-cert",
            str(pki["cert"]),
            "--tls-key",
            str(pki["key"]),
            "--tls-ca",
            str(pki["ca"]),
            "--tls-only",
        ]
    )
    assert (s.tls_port, s.tls_only, s.tls_ca) == (2762, True, pki["ca"])
    # TLS only on the guide's port 2575: the Service stays as it is.
    only = settings_for(
        ["receive", "--tls-only", "--tls-port", "2575"],
        {"STOWAWAY_TLS_CERT": str(pki["cert"]), "STOWAWAY_TLS_KEY": str(pki["key"])},
    )
    assert (only.port, only.tls_port, only.tls_only) == (2575, 2575, True)
    assert settings_for(["receive"]).tls_port == 0
    assert settings_for(["receive"]).tls_only is False
    env = {
        "STOWAWAY_TLS_PORT": "2762",
        "STOWAWAY_TLS_CERT": str(pki["cert"]),
        "STOWAWAY_TLS_KEY": str(pki["key"]),
        "STOWAWAY_TLS_ONLY": "true",
    }
    assert settings_for(["serve"], env).tls_only is True


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--tls-only"], {}, "--tls-only: needs --tls-port"),
        (["--tls-cert", "{cert}"], {}, "--tls-cert: has no effect without --tls-port"),
        (["--tls-ca", "{ca}"], {}, "--tls-ca: has no effect without --tls-port"),
        (["--tls-port", "2762"], {}, "--tls-port: needs --tls-cert and --tls-key"),
        (
            ["--tls-port", "2575", "--tls-cert", "{cert}", "--tls-key", "{key}"],
            {},
            "--tls-port: must differ from --port",
        ),
        (
            ["--tls-port", "2762", "--tls-cert", "{cert}", "--tls-key", "{other_key}"],
            {},
            "--tls-key: {other_key} does not match the certificate",
        ),
        ([], {"STOWAWAY_TLS_ONLY": "maybe"}, "STOWAWAY_TLS_ONLY: true or false"),
    ],
)
def test_inconsistent_settings(
    pki: dict[str, Path], argv: list[str], env: dict[str, str], message: str
) -> None:
    paths = {k: str(v) for k, v in pki.items()}
    with pytest.raises(SettingsError) as raised:
        settings_for(["receive", *(a.format(**paths) for a in argv)], env)
    assert str(raised.value).startswith(message.format(**paths))


def test_commands_without_a_receiver_do_not_open_the_tls_files(pki: dict[str, Path]) -> None:
    # A forwarder container may share the pod's variables without the TLS secret.
    env = {
        "STOWAWAY_TLS_PORT": "2762",
        "STOWAWAY_TLS_CERT": str(pki["missing"]),
        "STOWAWAY_TLS_KEY": str(pki["missing"]),
    }
    assert settings_for(["forward", "--dicomweb-url", "http://127.0.0.1:1/x"], env).tls_port
    with pytest.raises(SettingsError, match=r"--tls-cert: .* does not exist"):
        settings_for(["serve"], env)


def test_cli_exits_2_with_one_line(pki: dict[str, Path]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stowaway.cli",
            "receive",
            "--tls-port",
            "2762",
            "--tls-cert",
            str(pki["cert"]),
            "--tls-key",
            str(pki["other_key"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"stowaway: error: --tls-key: {pki['other_key']} does not match the certificate "
        f"in {pki['cert']}"
    ]
