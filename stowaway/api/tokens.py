"""``--admin-token-file``: who may act through the HTTP API.

The file holds one token a line, ``name:token``. ``name`` (1-64 of ``A-Z a-z 0-9 _ . @ -``,
starting with a letter or digit) is who acts: it goes into the log line of every action,
the token never does. ``token`` is the rest of the line, at least 16 printable characters
without spaces (``openssl rand -hex 32`` makes a good one). Blank lines and lines starting
with ``#`` are skipped; a name or token given twice is an error. The file is re-read when
it changes (a rotated Kubernetes Secret), and a request's token is compared with every
token in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")
#: Larger files are refused (a token file is a few lines).
MAX_FILE_BYTES = 64 * 1024


class TokenFileError(ValueError):
    """The token file cannot be read or is malformed; one line, never a token."""


def parse_tokens(text: str) -> dict[str, bytes]:
    """``{name: sha256(token)}`` of a token file's text."""
    by_name: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep or not NAME.fullmatch(name):
            raise TokenFileError(
                f"line {number}: expected name:token, the name 1-64 letters, digits or _.@-"
            )
        if not TOKEN.fullmatch(token):
            raise TokenFileError(
                f"line {number} ({name}): the token must be at least 16 printable characters, "
                "no spaces"
            )
        digest = hashlib.sha256(token.encode()).digest()
        if name in by_name:
            raise TokenFileError(f"line {number}: the name {name} is given twice")
        if digest in by_name.values():
            raise TokenFileError(f"line {number} ({name}): this token is given twice")
        by_name[name] = digest
    if not by_name:
        raise TokenFileError("holds no name:token line")
    return by_name


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int, int]
    digests: dict[str, bytes]


class AdminTokens:
    """The tokens of one file; raises :class:`TokenFileError` when it is unusable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded = self._load()

    def _stamp(self) -> tuple[int, int, int]:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise TokenFileError(f"cannot read {self.path}: {exc.strerror}") from None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _load(self) -> _Loaded:
        stamp = self._stamp()
        if stamp[2] > MAX_FILE_BYTES:
            raise TokenFileError(f"{self.path} is larger than {MAX_FILE_BYTES} bytes")
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise TokenFileError(f"cannot read {self.path}: {why}") from None
        return _Loaded(stamp, parse_tokens(text))

    def who(self, token: str) -> str | None:
        """The name whose token this is, or None. Every token is compared, each in
        constant time (of equal-length digests), so the answer's timing tells nothing."""
        with self._lock:
            if self._stamp() != self._loaded.stamp:
                self._loaded = self._load()
            digests = self._loaded.digests
        given = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for name, digest in digests.items():
            if hmac.compare_digest(given, digest):
                found = name
        return found
