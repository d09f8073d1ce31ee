"""Authentication of requests to the destination (a ``requests`` auth object per kind).

* ``GOOGLE``: Application Default Credentials (``google.auth.default``) with the
  cloud-healthcare scope -- the metadata server (GCE/GKE, Workload Identity) or the key
  file in GOOGLE_APPLICATION_CREDENTIALS. The token is refreshed before it expires, and
  once at once when the destination answers 401 to it (revoked or rotated early).
* ``BEARER``: a token read from a file, re-read when the file changes (Kubernetes
  secret rotation).
* ``BASIC``: a user name and a password read from a file (re-read the same way).
* ``NONE``: no authentication.

No token, password or key is ever put in a log line, an exception message or a repr.
"""

from __future__ import annotations

import base64
import enum
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import google.auth
import google.auth.transport.requests
import requests
import requests.auth
from google.auth import exceptions as google_exceptions

#: OAuth scope the Cloud Healthcare API needs.
HEALTHCARE_SCOPE: Final = "https://www.googleapis.com/auth/cloud-healthcare"


class AuthKind(enum.StrEnum):
    """How the forwarder authenticates to the destination."""

    GOOGLE = "google"
    BEARER = "bearer"
    BASIC = "basic"
    NONE = "none"


class AuthConfigError(ValueError):
    """The authentication settings are incomplete or wrong; the message says what to do."""


class CredentialsError(RuntimeError):
    """Credentials could not be obtained (at start-up or when refreshing a token).

    The destination cannot be reached with them, so the forwarder treats it as BLOCKED.
    The message never contains a secret.
    """


def default_auth_kind(url: str) -> AuthKind:
    """GOOGLE for the Cloud Healthcare API host, NONE for anything else."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "healthcare.googleapis.com" or (
        host.endswith(".googleapis.com") and "healthcare" in host  # regional endpoints
    ):
        return AuthKind.GOOGLE
    return AuthKind.NONE


class GoogleAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer <token>`` from google-auth credentials.

    The token is refreshed before each request that finds it invalid;
    ``credentials.valid`` already treats a token as expired a few minutes early
    (``google.auth._helpers.REFRESH_THRESHOLD``), so a request never leaves with a token
    about to lapse. Refreshes are serialised by a lock: the object may be shared by
    worker threads. Failures raise :class:`CredentialsError`.
    """

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._transport: google.auth.transport.requests.Request | None = None

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        headers: dict[str, str] = {}
        with self._lock:
            if not self._credentials.valid:
                self._refresh()
            self._credentials.apply(headers)
        r.headers.update(headers)
        return r

    def refresh_after_rejection(self, rejected_authorization: str | None) -> bool:
        """The destination answered 401 to a request sent with ``rejected_authorization``.

        A token revoked or rotated before its expiry is refused while
        google-auth still counts it valid: fetch a new one now instead of at
        expiry (up to an hour later). Another thread may have done so already,
        then its token is used. Returns whether the token now differs from the
        rejected one, i.e. whether sending the request again can help. Raises
        :class:`CredentialsError` when no token can be had.
        """
        with self._lock:
            if self._authorization() == rejected_authorization:
                self._refresh()
            return self._authorization() != rejected_authorization

    def _refresh(self) -> None:
        # google-auth retries the token fetch itself (metadata server, token
        # endpoint) with backoff; a failure here is final for this request.
        try:
            self._credentials.refresh(self._request())
        except google_exceptions.GoogleAuthError as exc:
            raise CredentialsError(f"cannot obtain Google credentials: {exc}") from None

    def _authorization(self) -> str | None:
        headers: dict[str, str] = {}
        if self._credentials.token:
            self._credentials.apply(headers)
        return headers.get("authorization")

    def _request(self) -> google.auth.transport.requests.Request:
        if self._transport is None:
            self._session = requests.Session()
            self._transport = google.auth.transport.requests.Request(session=self._session)
        return self._transport

    def close(self) -> None:
        """Close the HTTP session used for token refreshes."""
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session = None
            self._transport = None

    def __repr__(self) -> str:
        return f"GoogleAuth(credentials={type(self._credentials).__name__})"


class _SecretFile:
    """A small secret file, re-read whenever its mtime, size or inode changes.

    Kubernetes rotates a mounted secret by swapping a symlink, which changes the inode
    seen through the path. If the file is briefly missing or empty during a rotation,
    the last value read is kept.
    """

    def __init__(self, path: Path, what: str, strip: Callable[[str], str]) -> None:
        self.path = path
        self._what = what
        self._strip = strip
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._value: str | None = None

    def read(self) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)
                signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
                if signature != self._signature or self._value is None:
                    value = self._strip(self.path.read_text(encoding="utf-8"))
                    if not value:
                        raise CredentialsError(f"{self._what} file {self.path} is empty")
                    self._value, self._signature = value, signature
            except CredentialsError:
                if self._value is None:
                    raise
            except UnicodeDecodeError:
                # The codec error would quote the offending bytes of the secret.
                if self._value is None:
                    raise CredentialsError(
                        f"{self._what} file {self.path} is not UTF-8 text"
                    ) from None
            except OSError as exc:
                if self._value is None:
                    raise CredentialsError(
                        f"cannot read {self._what} file {self.path}: {exc.strerror}"
                    ) from None
            assert self._value is not None
            return self._value


def _strip_newline(text: str) -> str:
    # Passwords may legitimately start or end with spaces; files usually end with "\n".
    return text.rstrip("\r\n")


class BearerTokenFileAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer <token>`` with the token read from a file.

    Whitespace around the token is stripped; the file is re-read when it changes.
    """

    def __init__(self, token_file: Path) -> None:
        self._file = _SecretFile(Path(token_file), "bearer token", str.strip)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._file.read()}"
        return r

    def __repr__(self) -> str:
        return f"BearerTokenFileAuth(token_file={str(self._file.path)!r})"


class BasicFileAuth(requests.auth.AuthBase):
    """HTTP Basic authentication with the password read from a file.

    Only a trailing newline is stripped from the password; the file is re-read when it
    changes.
    """

    def __init__(self, user: str, password_file: Path) -> None:
        self._user = user
        self._file = _SecretFile(Path(password_file), "basic auth password", _strip_newline)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        pair = f"{self._user}:{self._file.read()}".encode()
        r.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return r

    def __repr__(self) -> str:
        return f"BasicFileAuth(user={self._user!r}, password_file={str(self._file.path)!r})"


def _google_auth() -> GoogleAuth:
    try:
        credentials, _project = google.auth.default(scopes=[HEALTHCARE_SCOPE])
    except google_exceptions.GoogleAuthError as exc:
        raise CredentialsError(
            f"cannot obtain Google credentials: {exc} -- run with a service account "
            "(GKE Workload Identity or a GCE/GKE node service account), or point "
            "GOOGLE_APPLICATION_CREDENTIALS at a service account key file"
        ) from None
    return GoogleAuth(credentials)


def _check_file(path: Path, what: str, option: str) -> None:
    try:
        with open(path, "rb") as f:
            empty = not f.read(1 << 16).strip()
    except OSError as exc:
        raise AuthConfigError(
            f"cannot read the {what} file {path} ({exc.strerror}): check {option}"
        ) from None
    if empty:
        raise AuthConfigError(f"the {what} file {path} is empty: put the {what} in it")


def build_auth(
    kind: AuthKind,
    *,
    bearer_token_file: Path | None = None,
    basic_user: str | None = None,
    basic_password_file: Path | None = None,
) -> requests.auth.AuthBase | None:
    """The ``requests`` auth object for ``kind`` (``None`` for NONE).

    Raises :class:`AuthConfigError` for missing or unusable inputs and, for GOOGLE,
    :class:`CredentialsError` when Application Default Credentials cannot be found.
    Secret files are checked for readability here so a bad setting fails at start-up.
    """
    kind = AuthKind(kind)
    if kind is not AuthKind.BEARER and bearer_token_file is not None:
        raise AuthConfigError(f"bearer_token_file is only used with bearer auth, not {kind}")
    if kind is not AuthKind.BASIC and (basic_user is not None or basic_password_file):
        raise AuthConfigError(
            f"basic_user/basic_password_file are only used with basic auth, not {kind}"
        )
    if kind is AuthKind.NONE:
        return None
    if kind is AuthKind.GOOGLE:
        return _google_auth()
    if kind is AuthKind.BEARER:
        if bearer_token_file is None:
            raise AuthConfigError(
                "bearer auth needs bearer_token_file: the path of a file holding the token"
            )
        _check_file(bearer_token_file, "bearer token", "bearer_token_file")
        return BearerTokenFileAuth(bearer_token_file)
    if not basic_user:
        raise AuthConfigError("basic auth needs basic_user: the user name to log in with")
    if basic_password_file is None:
        raise AuthConfigError(
            "basic auth needs basic_password_file: the path of a file holding the password"
        )
    _check_file(basic_password_file, "basic auth password", "basic_password_file")
    return BasicFileAuth(basic_user, basic_password_file)
