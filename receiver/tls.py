"""The server-side TLS context of the DICOM TLS listener.

TLS 1.2 is the floor (DICOM's BCP 195 profiles forbid anything older); Python's
default cipher list for a server context already excludes the weak suites. With a
CA file, every client must present a certificate issued by it (``CERT_REQUIRED``):
a client without one, or with one from another CA, fails the handshake before it
can send a single PDU.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; names the option."""


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key's
    # passphrase, hanging a headless service.
    raise _EncryptedKey


def _readable(path: Path, flag: str) -> None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise TLSConfigError(f"{flag}: {path} does not exist") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{flag}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise TLSConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _check_pem_certificate(path: Path, flag: str) -> None:
    text = path.read_text(encoding="ascii", errors="replace")
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    try:
        if match is None:
            raise ValueError("no PEM certificate")
        # Parses the certificate fully, so a failure later can only be the key's.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=match.group(0))
    except (ValueError, ssl.SSLError):
        raise TLSConfigError(f"{flag}: {path} is not a PEM certificate") from None


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """An ``SSLContext`` for accepting DICOM TLS connections.

    ``cert`` is the server certificate (PEM, the chain may follow it), ``key`` its
    unencrypted private key, ``ca`` (optional) the PEM bundle client certificates
    must chain to. Raises :class:`TLSConfigError` with a one-line message naming the
    option at fault: missing or unreadable file, not PEM, key not matching the
    certificate, encrypted key.
    """
    _readable(cert, "--tls-cert")
    _readable(key, "--tls-key")
    _check_pem_certificate(cert, "--tls-cert")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"--tls-key: {key} is encrypted; give an unencrypted key (mount it as a secret)"
        ) from None
    except ssl.SSLError as exc:
        if "mismatch" in _reason(exc):
            raise TLSConfigError(
                f"--tls-key: {key} does not match the certificate in {cert}"
            ) from None
        # The certificate was checked above, so what OpenSSL could not read is the key.
        raise TLSConfigError(f"--tls-key: {key} is not a PEM private key") from None
    if ca is not None:
        _readable(ca, "--tls-ca")
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise TLSConfigError(
                f"--tls-ca: {ca} is not a PEM CA bundle ({_reason(exc)})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
