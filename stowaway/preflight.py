"""The checks behind ``stowaway check``: can this gateway work, and if not, what to fix.

Each check returns a :class:`Result` (``ok``, ``FAIL`` with the fix, ``WARN`` or
``skip``); :func:`run_checks` runs them in the order the data flows. They change
nothing: one probe file is written (and removed) in the spool and one read-only
request goes to the destination. No token, password or key is ever put in a result.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from stowaway import destination_fixes as fixes
from stowaway.commands.formatting import human_bytes
from stowaway.db.engine import DatabaseEncodingError, make_engine, normalize_url
from stowaway.db.migrate import current_revision, head_revision
from stowaway.destinations import DestinationConfigError, destination_config, settings_for
from stowaway.forwarder.destinations import Destination, DimseDestination
from stowaway.receiver import pynetdicom_hooks
from stowaway.settings import Settings
from stowaway.text import first_line

if TYPE_CHECKING:
    import requests
    import requests.auth

# requests, google-auth and the forwarder are imported inside the destination checks:
# every stowaway command builds this parser, and most never talk to a destination.

#: The probe waits at most this long for an answer, whatever --read-timeout says.
PROBE_READ_TIMEOUT = 30.0


@dataclass(frozen=True)
class Result:
    """One check's verdict; ``fix`` says what to do when it is not ok."""

    status: str  # "ok", "FAIL", "WARN" or "skip"
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} — {self.fix}" if self.fix else text

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def ok(name: str, detail: str) -> Result:
    return Result("ok", name, detail)


def fail(name: str, detail: str, fix: str) -> Result:
    return Result("FAIL", name, detail, fix)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---------------------------------------------------------------------- local checks


def check_database(settings: Settings) -> Result:
    """Reachable, and at the schema revision this stowaway needs."""
    url = make_url(normalize_url(settings.db_url))
    shown = url.render_as_string(hide_password=True)
    head = head_revision()
    if url.get_backend_name() == "sqlite":
        database = Path(url.database or "")
        if url.database and url.database != ":memory:" and not database.exists():
            parent = _existing_ancestor(database.parent)
            if os.access(parent, os.W_OK):
                return ok("database", f"{shown} does not exist yet: created at first start")
            return fail(
                "database",
                f"{shown} does not exist and {parent} is not writable",
                "check --data-dir / --db-url and the volume's permissions",
            )
    elif "connect_timeout" not in url.query:
        url = url.update_query_dict({"connect_timeout": "10"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        revision = current_revision(engine)
    except DatabaseEncodingError as exc:
        return fail("database", f"{shown}: {exc.detail}", exc.fix)
    except SQLAlchemyError as exc:
        return fail(
            "database",
            f"cannot reach {shown}: {first_line(getattr(exc, 'orig', None) or exc)}",
            "check --db-url, that the database server runs, and that it accepts this user",
        )
    finally:
        engine.dispose()
    if revision == head:
        return ok("database", f"{shown} reachable, schema at the latest revision {head}")
    if url.get_backend_name() == "sqlite":
        return ok(
            "database",
            f"{shown} reachable, schema at revision {revision or 'none'}: "
            f"migrated to {head} at start-up",
        )
    return fail(
        "database",
        f"{shown} reachable, but its schema is at revision {revision or 'none'} "
        f"and this stowaway needs {head}",
        "run `stowaway migrate` (the init container does it on Kubernetes)",
    )


def check_spool(settings: Settings) -> list[Result]:
    """Writable (a probe file is written, fsynced and removed) with enough free space."""
    root = settings.spool_dir.absolute()
    results: list[Result] = []
    if root.exists():
        probe_dir = root / "tmp" if (root / "tmp").is_dir() else root
        probe = probe_dir / f".check-{os.getpid()}-{time.monotonic_ns()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"stowaway check")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
            results.append(ok("spool", f"{root} is writable"))
        except OSError as exc:
            results.append(
                fail(
                    "spool",
                    f"cannot write to {root}: {exc.strerror or exc}",
                    "check --spool-dir / --data-dir, the volume's mount and its permissions",
                )
            )
    else:
        parent = _existing_ancestor(root)
        if os.access(parent, os.W_OK):
            results.append(ok("spool", f"{root} does not exist yet: created at first start"))
        else:
            results.append(
                fail(
                    "spool",
                    f"{root} does not exist and {parent} is not writable",
                    "check --spool-dir / --data-dir and the volume's permissions",
                )
            )
    free = shutil.disk_usage(_existing_ancestor(root)).free
    wanted = settings.min_free_disk
    detail = f"{human_bytes(free)} free in the spool (minimum {human_bytes(wanted)})"
    if free < wanted:
        results.append(
            fail(
                "free-space",
                detail,
                "free space or grow the volume: below the minimum, receipts are refused "
                "with 0xA700 (or lower --min-free-disk)",
            )
        )
    else:
        results.append(ok("free-space", detail))
    return results


def check_dicom_port(settings: Settings) -> Result:
    """The receiver's address can be bound (as pynetdicom does, with SO_REUSEADDR)."""
    where = f"{settings.host}:{settings.port}"
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _name, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except socket.gaierror as exc:
        return fail(
            "dicom-port", f"--host {settings.host}: {exc.strerror}", "use 0.0.0.0 or an address"
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return Result(
                "WARN",
                "dicom-port",
                f"{where} is in use (stowaway already running?)",
                "if stowaway is not running, another program holds the port: stop it or "
                "choose another --port",
            )
        if exc.errno == errno.EACCES:
            return fail(
                "dicom-port",
                f"{where}: permission denied",
                "ports below 1024 need privileges: use the default 2575, or grant "
                "CAP_NET_BIND_SERVICE",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return fail(
                "dicom-port",
                f"{settings.host} is not an address of this machine",
                "use --host 0.0.0.0 or one of this host's addresses",
            )
        return fail("dicom-port", f"cannot bind {where}: {exc.strerror or exc}", "check --port")
    return ok("dicom-port", f"{where} can be bound (called AE title {settings.aet})")


# ---------------------------------------------------------------------- destination


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _proxy_for(url: str) -> str | None:
    """The proxy requests would use for ``url`` (host:port only: no credentials shown)."""
    import requests.utils

    proxies = requests.utils.get_environ_proxies(url)
    proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
    if not proxy:
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return f"{parts.hostname}:{parts.port or 80}"


def _trust_store(settings: Settings) -> str:
    """The CA file requests verifies against (the same order as StowClient)."""
    import requests.utils

    if settings.ca_bundle is not None:
        return str(settings.ca_bundle)
    env = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return env or requests.utils.DEFAULT_CA_BUNDLE_PATH


def check_destination(settings: Settings, url: str) -> tuple[list[Result], bool]:
    """DNS, TCP connect and TLS handshake; returns the results and whether it is reachable."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    results: list[Result] = []
    proxy = _proxy_for(url)
    if proxy is not None:
        results.append(
            ok(
                "dns",
                f"requests go through the proxy {proxy} (HTTPS_PROXY/HTTP_PROXY): "
                "direct DNS, TCP and TLS are the proxy's; the permission check goes through it",
            )
        )
        return results, True
    try:
        addresses = sorted(
            {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        )
    except socket.gaierror as exc:
        results.append(
            fail(
                "dns",
                f"cannot resolve {host}: {exc.strerror}",
                fixes.DNS_FIX,
            )
        )
        return results, False
    results.append(ok("dns", f"{host} resolves to {', '.join(addresses[:4])}"))
    timeout = settings.connect_timeout
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        if isinstance(exc, ConnectionRefusedError):
            why, fix = "connection refused", fixes.CONNECTION_REFUSED_FIX
        elif isinstance(exc, TimeoutError | socket.timeout):
            why = f"no answer within {timeout:g}s"
            fix = fixes.TIMEOUT_FIX
        else:
            why, fix = str(exc.strerror or exc), "check the network path to the destination"
        results.append(fail("connect", f"TCP {host}:{port}: {why}", fix))
        return results, False
    elapsed_ms = (time.monotonic() - started) * 1000
    with sock:
        results.append(ok("connect", f"TCP {host}:{port} in {elapsed_ms:.0f} ms"))
        if parts.scheme != "https":
            if _is_loopback(host):
                results.append(Result("skip", "tls", "plain http to a loopback address"))
            else:
                results.append(
                    Result(
                        "WARN",
                        "tls",
                        "plain http: images cross the network unencrypted",
                        "use an https:// URL",
                    )
                )
            return results, True
        results.append(_tls_handshake(sock, host, _trust_store(settings)))
    return results, not results[-1].failed


def _tls_handshake(sock: socket.socket, host: str, cafile: str) -> Result:
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        return fail(
            "tls", f"cannot load the CA bundle {cafile}: {first_line(exc)}", "check --ca-bundle"
        )
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return fail(
            "tls",
            f"the certificate of {host} is not trusted: {exc.verify_message}",
            fixes.TLS_UNTRUSTED_FIX,
        )
    except (ssl.SSLError, OSError) as exc:
        return fail(
            "tls",
            f"handshake with {host} failed: {first_line(exc)}",
            "check the URL's port and any TLS-intercepting proxy",
        )
    until = cert.get("notAfter", "?")
    return ok("tls", f"{version}, certificate for {host} verified, valid until {until}")


def _dummy_request(url: str) -> requests.PreparedRequest:
    import requests

    return requests.Request("GET", f"{url}/studies?limit=1").prepare()


def check_credentials(
    settings: Settings, url: str
) -> tuple[Result, requests.auth.AuthBase | None, bool]:
    """Build the auth object the forwarder would use and obtain a credential with it.

    Returns the result, the auth object, and whether the permission check can run.
    """
    from stowaway.forwarder.auth import (
        AuthConfigError,
        AuthKind,
        CredentialsError,
        build_auth,
        default_auth_kind,
    )

    kind = AuthKind(settings.auth) if settings.auth else default_auth_kind(url)
    if kind is AuthKind.GOOGLE:
        return _google_credentials(url)
    try:
        auth = build_auth(
            kind,
            bearer_token_file=settings.bearer_token_file,
            basic_user=settings.basic_user,
            basic_password_file=settings.basic_password_file,
        )
        if auth is not None:
            auth(_dummy_request(url))
    except (AuthConfigError, CredentialsError) as exc:
        return (
            fail("credentials", f"--auth {kind.value}: {exc}", fixes.AUTH_SETTINGS_FIX),
            None,
            False,
        )
    if kind is AuthKind.NONE:
        detail = "none (--auth none): requests carry no credentials"
    elif kind is AuthKind.BEARER:
        detail = f"bearer token read from {settings.bearer_token_file}"
    else:
        detail = (
            f"basic auth as {settings.basic_user}, "
            f"password read from {settings.basic_password_file}"
        )
    return ok("credentials", detail), auth, True


def _google_credentials(url: str) -> tuple[Result, requests.auth.AuthBase | None, bool]:
    import google.auth
    from google.auth import exceptions as google_exceptions

    from stowaway.forwarder.auth import HEALTHCARE_SCOPE, CredentialsError, GoogleAuth

    try:
        credentials, project = google.auth.default(scopes=[HEALTHCARE_SCOPE])
    except google_exceptions.GoogleAuthError as exc:
        return (
            fail(
                "credentials",
                f"no Google Application Default Credentials: {first_line(exc)}",
                "run with a service account (GKE Workload Identity or the node's service "
                "account), or point GOOGLE_APPLICATION_CREDENTIALS at a key file",
            ),
            None,
            False,
        )
    auth = GoogleAuth(credentials)
    try:
        auth(_dummy_request(url))  # refreshes: obtains an access token
    except CredentialsError as exc:
        auth.close()
        return (
            fail(
                "credentials",
                f"google: {exc}",
                fixes.GOOGLE_CREDENTIALS_FIX,
            ),
            None,
            False,
        )
    email = getattr(credentials, "service_account_email", None)
    who = f"service account {email}" if email and email != "default" else type(credentials).__name__
    where = f" (project {project})" if project else ""
    return ok("credentials", f"google: access token obtained for {who}{where}"), auth, True


def check_permission(settings: Settings, url: str, auth: requests.auth.AuthBase | None) -> Result:
    """One cheap authenticated request (QIDO-RS ``studies?limit=1``), 401/403 explained."""
    from stowaway.forwarder.outcome import OutcomeKind
    from stowaway.forwarder.stow import StowClient

    try:
        client = StowClient(
            url,
            auth,
            connect_timeout=settings.connect_timeout,
            read_timeout=min(settings.read_timeout, PROBE_READ_TIMEOUT),
            ca_bundle=str(settings.ca_bundle) if settings.ca_bundle else None,
        )
    except ValueError as exc:
        return fail("permission", str(exc), "check --dicomweb-url and --ca-bundle")
    with client:
        outcome = client.probe()
    status = outcome.http_status
    if outcome.kind is OutcomeKind.SUCCESS:
        return ok(
            "permission",
            f"authenticated request accepted (GET studies?limit=1: HTTP {status})",
        )
    if status in (401, 403):
        # explain_permission_error's text: the cause in plain words, then its fix.
        return fail("permission", f"HTTP {status}", outcome.detail)
    if status == 404 or (status is not None and 300 <= status < 400):
        return fail(
            "permission",
            f"HTTP {status}: no DICOMweb service at {url}",
            fixes.URL_FIX,
        )
    return fail(
        "permission",
        outcome.detail,
        fixes.UNREACHABLE_FIX,
    )


def check_pynetdicom_hooks() -> Result:
    """Whether every pynetdicom internal the receiver replaces still has the expected shape."""
    report = pynetdicom_hooks.check()
    return Result("ok" if report.all_active else "WARN", "pynetdicom hooks", report.summary())


# ---------------------------------------------------------------------- command


def run_checks(settings: Settings, emit: Callable[[Result], None]) -> list[Result]:
    """Run every check in order, passing each result to ``emit`` as soon as it is known."""
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        emit(result)

    add(check_database(settings))
    for result in check_spool(settings):
        add(result)
    add(check_dicom_port(settings))
    add(check_pynetdicom_hooks())
    try:
        config = destination_config(settings)
    except DestinationConfigError as exc:
        add(fail("destinations", str(exc), "fix the destinations configuration"))
        return results
    if config is None:
        add(Result("skip", "destination", "no --dicomweb-url given: receive only"))
        return results
    # One destination (--dicomweb-url alone) keeps the plain names; several are
    # told apart by a "name/" prefix on each of their lines.
    several = len(config.destinations) > 1
    for destination in config.destinations:
        prefix = f"{destination.name}/" if several else ""

        def add_named(result: Result, prefix: str = prefix) -> None:
            add(dataclasses.replace(result, name=prefix + result.name))

        for result in check_outbound(destination):
            add_named(result)
        if isinstance(destination, DimseDestination):
            add_named(check_dimse_destination(destination))
        else:
            check_dicomweb_destination(
                settings_for(settings, destination), destination.url, add_named
            )
    return results


def check_outbound(destination: Destination) -> list[Result]:
    """The destination's redaction and compression: its UID key readable, its keep list
    complete, and what the UID scheme gives away. Nothing for a destination sent originals."""
    outbound = destination.outbound
    if not outbound.changes_instances:
        return []
    from stowaway.forwarder.deidentify import REQUIRED, Mode, Redactor, UidKeyError
    from stowaway.forwarder.deidentify.tags import format_tag

    spec = outbound.redaction
    results: list[Result] = []
    if spec is not None:
        try:
            Redactor(spec)
        except UidKeyError as exc:
            return [
                fail(
                    "redaction",
                    f"{outbound.source}: {exc}",
                    "create it (head -c 32 /dev/urandom > FILE; chmod 600 FILE), keep a "
                    "copy: a new key gives every instance new UIDs",
                )
            ]
        if spec.mode is Mode.KEEP_LIST and (missing := sorted(REQUIRED - spec.tags)):
            from pydicom.datadict import keyword_for_tag

            names = ", ".join(keyword_for_tag(t) or format_tag(t) for t in missing[:6])
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            results.append(
                Result(
                    "WARN",
                    "redaction",
                    f"the keep list leaves out {names}{more}, which every instance needs: "
                    "they are kept anyway (UIDs replaced)",
                )
            )
        if spec.uid_scheme.value == "google":
            results.append(
                Result(
                    "WARN",
                    "redaction",
                    "uid_scheme google: anyone who can guess an original UID can confirm "
                    "its de-identified copy; use a key file for keyed UIDs",
                )
            )
    results.append(ok("redaction", f"{outbound.describe()} ({outbound.source})"))
    return results


def check_dicomweb_destination(settings: Settings, url: str, add: Callable[[Result], None]) -> None:
    """Reachability, credentials and permission of one DICOMweb destination."""
    reachable_results, reachable = check_destination(settings, url)
    for result in reachable_results:
        add(result)
    credentials, auth, usable = check_credentials(settings, url)
    add(credentials)
    if not reachable:
        add(Result("skip", "permission", "the destination is not reachable"))
    elif not usable:
        add(Result("skip", "permission", "no usable credentials"))
    else:
        add(check_permission(settings, url, auth))
    close = getattr(auth, "close", None)
    if callable(close):
        close()


def check_dimse_destination(destination: DimseDestination) -> Result:
    """C-ECHO to a DICOM node, as the forwarder would associate with it."""
    from stowaway.forwarder.dimse import DimseSender
    from stowaway.forwarder.outcome import OutcomeKind

    where = f"{destination.called_aet}@{destination.host}:{destination.port}"
    try:
        outcome = DimseSender(destination).echo()
    except (OSError, ValueError) as exc:  # a TLS file that cannot be loaded
        return fail("echo", f"{where}: {first_line(exc)}", "fix the destination's tls files")
    if outcome.kind is OutcomeKind.SUCCESS:
        return ok("echo", f"{where} answered C-ECHO ({outcome.detail})")
    if outcome.kind is OutcomeKind.BLOCKED:
        return fail(
            "echo",
            outcome.detail,
            fixes.DIMSE_REJECTED_FIX.format(
                calling_aet=destination.calling_aet, called_aet=destination.called_aet
            ),
        )
    return fail("echo", outcome.detail, "is the node running, and are host and port right?")
