"""The spool: where received instances wait on disk until they are forwarded.

Layout under the spool root::

    incoming/            pynetdicom's chunked-receive temporary files
    tmp/                 files being written; never referenced by a row
    YYYY/MM/DD/HH/<uuid>.dcm
                         finished Part-10 files, one per receipt

File names are random, never derived from UIDs, so a crafted SOP Instance UID
cannot escape the spool and two receipts of the same instance never collide.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

COPY_CHUNK = 1024 * 1024
#: A finished spool file's relative path as :meth:`Spool.write` makes it.
_SPOOLED_NAME = re.compile(r"[0-9]{4}/[0-9]{2}/[0-9]{2}/[0-9]{2}/[0-9a-f]+\.dcm")
#: The length of such a path's ``YYYY/MM/DD/HH`` part.
_HOUR_DIRECTORY = len("YYYY/MM/DD/HH")


class SpoolPathError(ValueError):
    """A stored relative path that would leave the spool."""


@dataclass(frozen=True)
class SpoolFile:
    """A file durably in the spool."""

    relative_path: str
    size_bytes: int
    sha256: str


class Spool:
    """Owns the spool directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.incoming_dir = self.root / "incoming"
        self.tmp_dir = self.root / "tmp"
        self._known_dirs: set[Path] = set()

    def prepare(self) -> None:
        """Create the fixed directories (owner-only) and check they are writable."""
        for directory in (self.root, self.incoming_dir, self.tmp_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()

    def absolute(self, relative_path: str) -> Path:
        """Resolve a stored relative path, refusing anything outside the spool."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise SpoolPathError(f"spool path {relative_path!r} is outside the spool")
        return path

    def write(self, header: bytes, source: BinaryIO, received_at: datetime) -> SpoolFile:
        """Write ``header`` then the rest of ``source`` to a new spool file, durably.

        The data is written to ``tmp/``, fsynced, renamed into its dated
        directory, and that directory is fsynced, so that once this returns
        the file survives a crash or power loss.
        """
        relative = received_at.strftime("%Y/%m/%d/%H/") + f"{uuid.uuid4().hex}.dcm"
        final = self.root / relative
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256(header)
        size = len(header)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, header)
                while chunk := source.read(COPY_CHUNK):
                    digest.update(chunk)
                    write_all(fd, chunk)
                    size += len(chunk)
                os.fsync(fd)
                check_size(fd, size)
            finally:
                os.close(fd)
            self._ensure_dir(final.parent)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return SpoolFile(relative, size, digest.hexdigest())

    def adopt(
        self,
        path: Path,
        size_bytes: int,
        sha256: str,
        received_at: datetime,
        *,
        sync_dir: bool = True,
    ) -> SpoolFile:
        """Rename a finished, already fsynced file (on the spool's file system) into place.

        The receiver's incoming files are written in the spool's format as they
        arrive, so they need no copy. With ``sync_dir=False`` the caller fsyncs
        the directory (:meth:`sync_directory`) before relying on the file, so
        that one fsync can cover several files.
        """
        relative = received_at.strftime("%Y/%m/%d/%H/") + f"{uuid.uuid4().hex}.dcm"
        final = self.root / relative
        self._ensure_dir(final.parent)
        os.rename(path, final)
        if sync_dir:
            _fsync_dir(final.parent)
        return SpoolFile(relative, size_bytes, sha256)

    def sync_directory(self, relative_path: str) -> None:
        """fsync the directory holding a spool file, making its name durable."""
        directory = self.root / relative_path.rpartition("/")[0]
        if directory not in self._known_dirs:  # not one this process made: check it
            directory = self.absolute(relative_path).parent
        _fsync_dir(directory)

    def remove(self, relative_path: str) -> None:
        """Delete a spool file if it is there."""
        self.absolute(relative_path).unlink(missing_ok=True)

    def remove_if_present(self, relative_paths: Iterable[str]) -> int:
        """Delete those of ``relative_paths`` that are still there; returns how many.

        For many files at once, most of them usually gone already (retention). A
        path spelled as :meth:`write` makes them (``YYYY/MM/DD/HH/<hex>.dcm``) cannot
        leave the spool and is unlinked as it is, unless its hour's directory is
        gone (one check per directory, not a failed unlink per file: see
        :meth:`prune_empty_directories`); any other goes through :meth:`absolute`,
        which resolves it component by component. A path that would leave the
        spool is skipped.
        """
        removed = 0
        present: dict[str, bool] = {}
        for relative in relative_paths:
            try:
                if _SPOOLED_NAME.fullmatch(relative):
                    hour = relative[:_HOUR_DIRECTORY]
                    if hour not in present:
                        present[hour] = os.path.isdir(os.path.join(self.root, hour))
                    if not present[hour]:
                        continue
                    os.unlink(os.path.join(self.root, relative))
                else:
                    self.absolute(relative).unlink()
                removed += 1
            except (OSError, SpoolPathError):
                continue
        return removed

    def prune_empty_directories(self, before: datetime) -> int:
        """Remove the empty ``YYYY/MM/DD/HH`` directories of hours that ended before
        ``before``, and the day, month and year directories they leave empty, if
        those ended before it too; returns how many were removed.

        Retention calls it with its cutoff, days in the past: nothing writes into an
        hour directory after its hour (a receipt's directory is its receive time's),
        so a directory removed here is never one the receiver is about to use, and
        a year of hourly directories does not pile up in the spool. A removal a
        crash undoes leaves an empty directory, removed by the next call.
        """
        removed = 0

        def ended(parts: list[str]) -> bool:
            """Whether the year, month, day or hour ``parts`` names ended before ``before``."""
            try:
                # month, day and hour default to the first of their span
                year, month, day, hour = [*map(int, parts), *(1, 1, 0)[len(parts) - 1 :]]
                start = datetime(year, month, day, hour, tzinfo=UTC)
            except ValueError:  # not a date: not the layout's, left alone
                return False
            if len(parts) == 1:
                end = start.replace(year=start.year + 1)
            elif len(parts) == 2:
                end = (start + timedelta(days=32)).replace(day=1)
            else:
                end = start + (timedelta(days=1) if len(parts) == 3 else timedelta(hours=1))
            return end <= before

        def prune(directory: str, parts: list[str]) -> bool:
            """Whether ``directory`` was removed (after what it holds was pruned)."""
            nonlocal removed
            if len(parts) < 4:
                width = 4 if not parts else 2
                for child in _digit_entries(os.path.join(self.root, directory), width):
                    prune(f"{directory}/{child}" if directory else child, [*parts, child])
            if not parts or not ended(parts):
                return False
            try:
                os.rmdir(os.path.join(self.root, directory))
            except OSError:  # not empty (a failed row's file, say), or gone
                return False
            removed += 1
            return True

        prune("", [])
        return removed

    def verify(self, relative_path: str, size_bytes: int, sha256: str) -> str | None:
        """Return ``None`` if the file is intact, else why not."""
        try:
            path = self.absolute(relative_path)
        except SpoolPathError as exc:
            return str(exc)
        if not path.is_file():
            return "spool file is missing"
        if path.stat().st_size != size_bytes:
            return f"spool file size {path.stat().st_size} != recorded {size_bytes}"
        if file_sha256(path) != sha256:
            return "spool file checksum does not match the recorded one"
        return None

    def iter_files(self) -> Iterator[str]:
        """Relative paths of every finished spool file."""
        for path in self.root.glob("[0-9][0-9][0-9][0-9]/*/*/*/*.dcm"):
            yield path.relative_to(self.root).as_posix()

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        parent = directory
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # New directory entries must be durable too, from the top down.
        for created in reversed(missing):
            _fsync_dir(created.parent)
        self._known_dirs.add(directory)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``, however many ``write`` calls it takes.

    ``os.write`` may write less than asked (a file system filling up, a
    signal); a write that makes no progress at all is reported as ENOSPC
    rather than retried forever.
    """
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            n = os.write(fd, view[written:])
            if n <= 0:
                raise OSError(errno.ENOSPC, f"no space written after {written} bytes")
            written += n


def check_size(fd: int, expected: int) -> None:
    """Raise unless the file behind ``fd`` holds exactly ``expected`` bytes (before a rename).

    The last line of defence against a short write no loop noticed: a file
    shorter than what was received must never be renamed into the spool.
    """
    actual = os.fstat(fd).st_size
    if actual != expected:
        raise OSError(errno.EIO, f"wrote {actual} of {expected} bytes")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digit_entries(directory: str, width: int) -> list[str]:
    """The names in ``directory`` that are ``width`` digits (the dated layout's)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if len(n) == width and n.isdigit())
