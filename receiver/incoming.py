"""Chunked receive straight into the spool's file format.

pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) streams each
C-STORE dataset into a ``tempfile.NamedTemporaryFile`` behind a file meta of
its own, flushing after every PDV. The handler then had to read the header
with pydicom and copy the whole dataset behind stowaway's deterministic file
meta, hashing it on the way: every byte written twice and read twice.

:mod:`receiver.pynetdicom_hooks` puts :class:`IncomingFile` in the temporary
file's place (:func:`new_incoming_file`), and hands it the UIDs pynetdicom
builds its file meta from (:func:`create_file_meta`,
:func:`write_file_meta_info`). It takes the same writes, but

* writes stowaway's deterministic file meta (:func:`stowaway.db.part10.part10_header`)
  instead of pynetdicom's, so the file is already the spool file (and
  pydicom's file meta machinery, a millisecond per instance, never runs);
* hashes the bytes as they arrive, so the SHA-256 needs no second read;
* gathers the PDVs in memory and writes them 128 KiB at a time (pynetdicom's
  flush after every PDV is a no-op here), keeping the start of the dataset for
  the UID scan, and starts the disk write of each piece at once
  (``sync_file_range``). Hashing, writing and most of the disk's work thus
  happen while the rest of the dataset is still arriving, and the handler,
  whose time the sender waits for, is left with the last piece and an fsync
  that finds little to do.

The store handler finds the file by path (:func:`lookup`), calls
:meth:`IncomingFile.finish`, fsyncs it and renames it into the spool. Nothing
is acknowledged earlier than before: the handler still fsyncs the file and its
directory and commits the row before it answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import struct
import sys
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta as _pydicom_create_file_meta

from stowaway.db.part10 import part10_header
from stowaway.db.spool import check_size, write_all

log = logging.getLogger("stowaway.receiver")

#: PDVs are gathered up to this many bytes before one write (and its writeback).
WRITE_CHUNK: Final = 128 * 1024
#: How much of the dataset's start is kept in memory for the UID scan.
HEAD_BYTES: Final = 128 * 1024

_PREAMBLE_AND_MAGIC: Final = 132
_GROUP_LENGTH_END: Final = 144  # preamble, "DICM", (0002,0000) UL element


@dataclass(frozen=True)
class Received:
    """A dataset completely written to its incoming file."""

    path: str
    #: UIDs the file meta was built from (the C-STORE request's and the context's)
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: bytes of file meta ahead of the dataset
    header_length: int
    size_bytes: int
    sha256: str
    #: the start of the dataset (up to HEAD_BYTES), for the UID scan
    head: bytes
    #: False when pynetdicom's file meta could not be parsed and was kept as written
    deterministic: bool


@dataclass(frozen=True)
class InstanceLimits:
    """Bounds on one dataset, enforced while it arrives."""

    #: dataset bytes (after the file meta) one C-STORE may send (``--max-instance-size``)
    max_instance_size: int = 4 * 1024**3
    #: free bytes the spool's file system must keep while a dataset is written
    #: (``--min-free-disk``); 0 for no floor
    min_free_disk: int = 0


def _no_abort() -> None:
    """Where nothing can abort the association: the handler answers 0xA700 instead."""


class InstanceRefused(OSError):
    """A dataset crossed one of its :class:`InstanceLimits`; its file is gone."""


class IncomingFile:
    """The file-like object pynetdicom's chunked receive writes one dataset into.

    When the dataset crosses one of its ``limits`` the file is deleted at once,
    the rest of the dataset is dropped as it arrives, and ``abort`` is called
    (on the thread that reads the association, which it may abort).
    """

    def __init__(
        self,
        directory: str | None = None,
        limits: InstanceLimits | None = None,
        abort: Callable[[], object] = _no_abort,
    ) -> None:
        self._limits = limits or InstanceLimits()
        self._abort = abort
        self._received = 0  # dataset bytes received (no file meta)
        # A write error is kept and raised by finish(), in the handler, which
        # answers it with 0xA700: raised here, in pynetdicom's reading thread, it
        # would abort the association instead.
        self._error: OSError | None = None
        self._fd: int | None = None
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        except OSError as exc:
            self._error = exc
            self.name = os.path.join(directory or tempfile.gettempdir(), f"{uuid.uuid4().hex}.dcm")
        self._pending = bytearray()  # bytes not yet written to the file
        self._meta = bytearray()  # pynetdicom's header, until it is complete
        self._digest = hashlib.sha256()
        self._size = 0
        self._head = b""
        self._header: tuple[str, str, str, int] | None = None
        self._deterministic = True
        self._result: Received | None = None
        self._lock = threading.Lock()
        _register(self)

    # -- what pynetdicom calls ------------------------------------------------

    @property
    def file(self) -> IncomingFile:
        """pynetdicom flushes ``file`` after every PDV."""
        return self

    def write(self, data: bytes) -> int:
        if self._error is not None:
            return len(data)  # dropped: finish() reports the error
        if self._header is None:
            self._meta += data
            self._take_meta()
            return len(data)
        self._received += len(data)
        if self._received > self._limits.max_instance_size:
            self._refuse(
                "larger than --max-instance-size", limit_bytes=self._limits.max_instance_size
            )
            return len(data)
        self._pending += data
        if len(self._pending) >= WRITE_CHUNK:
            self._spill(writeback=True)
            self._check_free_space()
        return len(data)

    def flush(self) -> None:
        """A no-op: the data reaches the file in WRITE_CHUNK pieces and at ``finish``."""

    def close(self) -> None:
        """Write what is pending and close (pynetdicom calls this after the handler)."""
        with self._lock:
            if self._fd is None:
                return
            try:
                if self._result is None:
                    self._spill()
            finally:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        # An association aborted mid-transfer drops the message, and with it this
        # object, without closing it: give back the descriptor and the disk space.
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)
            if getattr(self, "_result", None) is None:
                with contextlib.suppress(OSError):
                    os.unlink(self.name)

    # -- what the store handler calls -------------------------------------------

    def finish(self) -> Received:
        """Write everything received to the file and describe it (idempotent)."""
        with self._lock:
            if self._result is not None:
                return self._result
            if self._error is not None:
                raise self._error
            if self._fd is None:
                raise OSError(f"incoming file {self.name} is already closed")
            if self._header is None:  # no dataset bytes at all: keep whatever came
                self._pending[:0] = self._meta
                self._meta = bytearray()
                self._header = ("", "", "", len(self._pending))
                self._deterministic = False
            self._spill()
            if self._error is None:
                try:
                    check_size(self._fd, self._size)
                except OSError as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            sop_class, sop_instance, syntax, header_length = self._header
            self._result = Received(
                path=self.name,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                transfer_syntax_uid=syntax,
                header_length=header_length,
                size_bytes=self._size,
                sha256=self._digest.hexdigest(),
                head=self._head,
                deterministic=self._deterministic,
            )
            return self._result

    def sync(self) -> None:
        """fsync the file's data and size (after :meth:`finish`)."""
        with self._lock:
            if self._fd is None:
                raise OSError(f"incoming file {self.name} is already closed")
            os.fsync(self._fd)

    # -- internals -----------------------------------------------------------------

    def _check_free_space(self) -> None:
        floor = self._limits.min_free_disk
        if not floor or self._fd is None or self._error is not None:
            return
        try:
            stats = os.fstatvfs(self._fd)
        except OSError:
            return  # the next write reports a real problem
        if stats.f_bavail * stats.f_frsize < floor:
            self._refuse("free space below --min-free-disk", limit_bytes=floor)

    def _refuse(self, reason: str, **fields: object) -> None:
        """Give up this dataset: delete its file, drop what follows, abort the association."""
        with self._lock:
            self._error = InstanceRefused(errno.EFBIG, reason)
            self._pending = bytearray()
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.name)
        log.warning(
            "instance_refused",
            extra={
                "sop_instance_uid": self._header[1] if self._header else "",
                "received_bytes": self._received,
                "reason": reason,
                **fields,
            },
        )
        self._abort()

    def start(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        """Begin with stowaway's file meta for these UIDs (see :func:`write_file_meta_info`)."""
        if self._header is not None or len(self._meta) > _PREAMBLE_AND_MAGIC:
            raise ValueError("the file meta must come first")
        self._meta = bytearray()  # pynetdicom's preamble and "DICM": ours replaces them
        header = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        self._header = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, len(header))
        self._pending += header

    def _take_meta(self) -> None:
        """Swap pynetdicom's file meta for stowaway's once all of it has arrived."""
        meta = self._meta
        if len(meta) < _GROUP_LENGTH_END:
            return
        end = _GROUP_LENGTH_END + struct.unpack_from("<I", meta, 140)[0]
        if len(meta) < end:
            return
        self._meta = bytearray()
        rest = bytes(meta[end:])
        uids = _parse_meta(bytes(meta[:end]))
        if uids is None:
            header = bytes(meta[:end])
            self._header = ("", "", "", len(header))
            self._deterministic = False
        else:
            header = part10_header(*uids)
            self._header = (*uids, len(header))
        self._pending += header
        if rest:
            self.write(rest)

    def _spill(self, *, writeback: bool = False) -> None:
        """Hash and write what is pending; ``writeback`` starts its disk write too.

        Only pieces written while the dataset is still arriving ask for it: the
        last piece is followed by the handler's fsync, which writes it anyway.
        """
        pending = self._pending
        if not pending:
            return
        if not self._head:
            start = self._header[3] if self._header else 0
            self._head = bytes(pending[start : start + HEAD_BYTES])
        self._digest.update(pending)
        self._pending = bytearray()
        if self._fd is None or self._error is not None:
            return
        try:
            write_all(self._fd, pending)
        except OSError as exc:
            self._error = exc
        if writeback and self._error is None:
            # Start writing this piece to disk now, so that the handler's fsync at
            # the end finds little left to write.
            start_writeback(self._fd, self._size, len(pending))
        self._size += len(pending)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range() if sys.platform == "linux" else None
_SYNC_FILE_RANGE_WRITE: Final = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk, without waiting for it.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which keeps the pages
    cached (the forwarder reads them soon). Elsewhere ``POSIX_FADV_DONTNEED``,
    which starts the writeback too. Neither makes anything durable: the fsync
    before the answer still does. Errors are ignored: that fsync reports them.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
        return
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _parse_meta(meta: bytes) -> tuple[str, str, str] | None:
    """SOP Class, SOP Instance and Transfer Syntax UIDs from a Part-10 header, else None."""
    if meta[128:132] != b"DICM":
        return None
    found: dict[int, str] = {}
    pos = _PREAMBLE_AND_MAGIC
    try:
        while pos < len(meta):
            group, element, vr = struct.unpack_from("<HH2s", meta, pos)
            if group != 0x0002:
                return None
            if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
                length = struct.unpack_from("<I", meta, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from("<H", meta, pos + 6)[0]
                pos += 8
            if element in (0x0002, 0x0003, 0x0010):
                found[element] = meta[pos : pos + length].decode("ascii").strip("\0 ")
            pos += length
    except (struct.error, UnicodeDecodeError):
        return None
    if pos != len(meta) or len(found) != 3 or not all(found.values()):
        return None
    return found[0x0002], found[0x0003], found[0x0010]


# -- the registry and the factory pynetdicom calls ---------------------------------

_files: weakref.WeakValueDictionary[str, IncomingFile] = weakref.WeakValueDictionary()
_files_lock = threading.Lock()
_directory: str | None = None


def _register(f: IncomingFile) -> None:
    with _files_lock:
        _files[f.name] = f


def lookup(path: object) -> IncomingFile | None:
    """The :class:`IncomingFile` behind ``event.dataset_path``, if it is one of ours."""
    with _files_lock:
        return _files.get(str(path))


_limits = InstanceLimits()
_abort: Callable[[], object] = _no_abort


def configure(
    directory: str, limits: InstanceLimits, abort: Callable[[], object] = _no_abort
) -> None:
    """How :func:`new_incoming_file` makes files: where (the spool's ``incoming/``),
    within which limits, and how to abort the association that crosses one."""
    global _directory, _limits, _abort
    _directory, _limits, _abort = directory, limits, abort


def new_incoming_file(*_args: Any, **_kwargs: Any) -> IncomingFile:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, ours."""
    return IncomingFile(_directory, _limits, _abort)


class _MetaUIDs(NamedTuple):
    """What pynetdicom builds a file meta from, without building it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def create_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **_rest: Any
) -> _MetaUIDs:
    """pynetdicom's ``create_file_meta``, keeping only the three UIDs."""
    return _MetaUIDs(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def write_file_meta_info(fp: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
    """Start an :class:`IncomingFile` with stowaway's file meta; anything else as pydicom."""
    if isinstance(meta, _MetaUIDs):
        if isinstance(fp, IncomingFile):
            fp.start(*meta)
            return
        meta = _pydicom_create_file_meta(
            sop_class_uid=UID(meta.sop_class_uid),
            sop_instance_uid=UID(meta.sop_instance_uid),
            transfer_syntax=UID(meta.transfer_syntax),
        )
    _pydicom_write_file_meta_info(fp, meta, *args, **kwargs)
