"""Every pynetdicom internal the receiver replaces, installed and checked in one place.

pynetdicom extends only through its event handlers; where that is too slow or
too trusting, stowaway replaces one of its internals. Each replacement is a
*hook* with a name, the shape it expects of pynetdicom (checked before it is
installed) and a fallback (pynetdicom's own behaviour) when the shape is not
what it expects, as after an upgrade. :func:`install` reports which hooks took,
logs one warning per hook that fell back and one line naming the active ones;
``stowaway check`` prints the same (:func:`check`).

Process-wide, at start-up (:func:`install`):

``chunked_file``
    ``pynetdicom.dimse_messages.NamedTemporaryFile`` (expected: the standard
    library's ``tempfile.NamedTemporaryFile``, and ``Association.abort`` taking
    ``block``) returns a :class:`receiver.incoming.IncomingFile` in the spool's
    ``incoming/``: each dataset is written, hashed and started to disk while it
    arrives, already in the spool's format, and a limit (``--max-instance-size``,
    the ``--min-free-disk`` floor) aborts the association (``abort(block=False)``
    on the DUL thread, found as the current thread) as it is crossed. Fallback:
    pynetdicom's own temporary files, put on the spool's file system by setting
    ``tempfile.tempdir`` for the whole process (only then), and the store
    handler copies each dataset behind stowaway's file meta (slower, the same
    acknowledgement guarantees, but **no limit while a dataset arrives**: the
    floor is checked when it is complete).
``file_meta``
    ``pynetdicom.dimse_messages.create_file_meta`` and ``write_file_meta_info``
    (expected: pynetdicom's ``dsutils.create_file_meta`` taking
    ``sop_class_uid``, ``sop_instance_uid`` and ``transfer_syntax`` keywords,
    and pydicom's ``filewriter.write_file_meta_info``) hand the three UIDs to
    the incoming file, which writes stowaway's hand-encoded file meta instead
    of pydicom's (about a millisecond per instance on the thread that reads the
    network). Given any other file they do what the originals do. Fallback: the
    incoming file parses the file meta pynetdicom writes.
``waking_clock``
    ``pynetdicom.dul.time`` and ``pynetdicom.association.time`` (expected: the
    ``time`` module) become :class:`receiver.wakeups.Clock`, whose ``sleep``
    returns early on a thread prepared by ``waking_queues``. Fallback: the
    reactors poll every millisecond, as pynetdicom does.

Per connection, at EVT_CONN_OPEN (:func:`prepare_connection`):

``pdu_reader``
    ``recv`` of the accepted ``pynetdicom.transport.AssociationSocket``
    (expected: ``recv(self, nr_bytes)``, called by
    ``DULServiceProvider._read_pdu_data`` first for the 6-byte PDU header)
    becomes :class:`receiver.socket_reader.PduReader`: whole PDUs in few
    reads, a declared length above the limits refused before anything is
    allocated, and deadlines for slow PDUs. Fallback: pynetdicom's ``recv``,
    which reads in 4 KiB pieces and trusts the declared length: **no PDU size
    or time bound** (the warning says so).
``waking_queues``
    the DUL's ``to_provider_queue`` and the DIMSE ``msg_queue`` (expected:
    empty ``queue.Queue`` objects on ``Thread`` subclasses, checked for each
    association) become queues that wake the waiting thread on ``put``.
    Fallback (for that association): polling.

Also set here, documented pynetdicom switches rather than internals:
``_config.STORE_RECV_CHUNKED_DATASET`` (stream datasets to a file, never to
memory) and ``_config.UNRESTRICTED_STORAGE_SERVICE`` (store any SOP class).

Internals used but not replaced, by :mod:`receiver.scp` (a change there fails
loudly in the tests rather than silently): ``RequestHandler._create_association``
(the gate's hand-over), ``AE._servers`` (so ``AE.shutdown`` finds our
listeners), ``dul.to_user_queue`` (waking an association thread whose
connection closed before its request), ``dimse.message._data_set_file`` (the
partial dataset of a cut association) and ``acse.send_reject`` from
EVT_REQUESTED.
"""

from __future__ import annotations

import inspect
import logging
import queue
import socket
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pynetdicom
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pynetdicom import _config, dimse_messages
from pynetdicom import association as _association_module
from pynetdicom import dul as _dul_module
from pynetdicom.dsutils import create_file_meta as _pynetdicom_create_file_meta
from pynetdicom.transport import AssociationSocket

from stowaway.receiver import incoming, socket_reader, wakeups

log = logging.getLogger("stowaway.receiver")

CHUNKED_FILE: Final = "chunked_file"
FILE_META: Final = "file_meta"
WAKING_CLOCK: Final = "waking_clock"
PDU_READER: Final = "pdu_reader"
WAKING_QUEUES: Final = "waking_queues"

#: What each hook's fallback costs, for the warning.
_FALLBACK_EFFECT: Final = {
    CHUNKED_FILE: "pynetdicom's temporary files, copied once more; no size limit while arriving",
    FILE_META: "pynetdicom's file meta parsed for every instance (slower)",
    WAKING_CLOCK: "pynetdicom's 1 ms polling (slower small instances)",
    PDU_READER: "pynetdicom's recv: no bound on declared PDU lengths or on slow peers",
    WAKING_QUEUES: "pynetdicom's 1 ms polling (slower small instances)",
}


@dataclass(frozen=True)
class Hook:
    """One replacement: whether it took, and why not."""

    name: str
    active: bool
    reason: str = ""


@dataclass(frozen=True)
class HookReport:
    """Which hooks took, in the order of the module docstring."""

    hooks: tuple[Hook, ...]

    def active(self, name: str) -> bool:
        return any(h.name == name and h.active for h in self.hooks)

    @property
    def all_active(self) -> bool:
        return all(h.active for h in self.hooks)

    def summary(self) -> str:
        """One line: the active hooks, and those that fell back with the reason."""
        active = [h.name for h in self.hooks if h.active]
        text = f"pynetdicom {pynetdicom.__version__}: active {', '.join(active) or 'none'}"
        fell_back = [f"{h.name} ({h.reason})" for h in self.hooks if not h.active]
        if fell_back:
            text += f"; fell back: {', '.join(fell_back)}"
        return text


# -- shape checks: each returns None when pynetdicom looks as the hook expects ----


def _parameters(function: Any) -> list[str]:
    """The names of a function's parameters, in order ([] if it has no signature)."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _chunked_file_shape() -> str | None:
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    if current is incoming.new_incoming_file:
        return None
    if current is not tempfile.NamedTemporaryFile:
        return "dimse_messages.NamedTemporaryFile is not tempfile.NamedTemporaryFile"
    if "block" not in _parameters(getattr(_association_module.Association, "abort", None)):
        return "Association.abort takes no block argument"
    return None


def _abort_reading_thread() -> None:
    """Abort the association whose DUL thread is the current one (an incoming file's limit).

    pynetdicom decodes P-DATA on the DUL thread (a ``Thread`` with an ``assoc``);
    ``abort(block=False)`` queues the A-ABORT for that same thread's next loop,
    as pynetdicom does for an abort from inside an event handler.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    abort = getattr(assoc, "abort", None)
    if callable(abort):
        abort(block=False)


def _file_meta_shape() -> str | None:
    create = getattr(dimse_messages, "create_file_meta", None)
    write = getattr(dimse_messages, "write_file_meta_info", None)
    if create is incoming.create_file_meta and write is incoming.write_file_meta_info:
        return None
    if create is not _pynetdicom_create_file_meta:
        return "dimse_messages.create_file_meta is not pynetdicom's"
    if write is not _pydicom_write_file_meta_info:
        return "dimse_messages.write_file_meta_info is not pydicom's"
    expected = {"sop_class_uid", "sop_instance_uid", "transfer_syntax"}
    if not expected <= set(_parameters(create)):
        return "create_file_meta takes other keywords"
    return None


def _waking_clock_shape() -> str | None:
    for module in (_dul_module, _association_module):
        current = getattr(module, "time", None)
        if not isinstance(current, types.ModuleType | wakeups.Clock) or (
            isinstance(current, types.ModuleType) and current is not time
        ):
            return f"{module.__name__}.time is not the time module"
    return None


def _pdu_reader_shape() -> str | None:
    recv = getattr(AssociationSocket, "recv", None)
    if not callable(recv) or _parameters(recv) != ["self", "nr_bytes"]:
        return "AssociationSocket.recv is not recv(self, nr_bytes)"
    read = getattr(_dul_module.DULServiceProvider, "_read_pdu_data", None)
    if not callable(read):
        return "DULServiceProvider._read_pdu_data is missing"
    try:
        source = inspect.getsource(read)
    except (OSError, TypeError):
        return None  # no source to read (a frozen install): the signature must do
    if ".recv(6)" not in source:
        return "DULServiceProvider._read_pdu_data no longer reads a 6-byte header first"
    return None


def _waking_queues_shape() -> str | None:
    for cls in (_dul_module.DULServiceProvider, _association_module.Association):
        if not issubclass(cls, threading.Thread):
            return f"{cls.__name__} is not a Thread"
    return None


_SHAPES: Final[tuple[tuple[str, Callable[[], str | None]], ...]] = (
    (CHUNKED_FILE, _chunked_file_shape),
    (FILE_META, _file_meta_shape),
    (WAKING_CLOCK, _waking_clock_shape),
    (PDU_READER, _pdu_reader_shape),
    (WAKING_QUEUES, _waking_queues_shape),
)


def check() -> HookReport:
    """Which hooks would take on the installed pynetdicom (installs nothing)."""
    hooks = []
    for name, shape in _SHAPES:
        reason = shape()
        hooks.append(Hook(name, reason is None, reason or ""))
    return HookReport(tuple(hooks))


# -- installing ----------------------------------------------------------------------

_installed: HookReport | None = None


def install(incoming_dir: str, limits: incoming.InstanceLimits | None = None) -> HookReport:
    """Install every hook whose shape checks out; log and return the report.

    Safe to call again (a second receiver in one process): hooks already
    installed count as taken.
    """
    global _installed
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    report = check()
    module: Any = dimse_messages
    incoming.configure(incoming_dir, limits or incoming.InstanceLimits(), _abort_reading_thread)
    if report.active(CHUNKED_FILE):
        module.NamedTemporaryFile = incoming.new_incoming_file
    else:
        # pynetdicom's own temporary files go to the default temporary directory:
        # put them on the spool's file system (the container's root is read-only).
        tempfile.tempdir = incoming_dir
    if report.active(FILE_META):
        module.create_file_meta = incoming.create_file_meta
        module.write_file_meta_info = incoming.write_file_meta_info
    if report.active(WAKING_CLOCK):
        install_waking_clock()
    for hook in report.hooks:
        if not hook.active:
            log.warning(
                "pynetdicom_hook_fell_back",
                extra={
                    "hook": hook.name,
                    "reason": hook.reason,
                    "effect": _FALLBACK_EFFECT[hook.name],
                    "pynetdicom": pynetdicom.__version__,
                },
            )
    log.info(
        "pynetdicom_hooks",
        extra={
            "pynetdicom": pynetdicom.__version__,
            "active": ",".join(h.name for h in report.hooks if h.active),
            "fell_back": ",".join(h.name for h in report.hooks if not h.active),
        },
    )
    _installed = report
    return report


def install_waking_clock() -> bool:
    """Give pynetdicom's DUL and association modules :class:`wakeups.Clock`, if they
    still use the ``time`` module under that name (idempotent)."""
    if _waking_clock_shape() is not None:
        return False
    for module in (_dul_module, _association_module):
        module.time = wakeups.Clock()  # type: ignore[attr-defined]
    return True


def prepare_connection(assoc: Any, limits: socket_reader.PduLimits) -> None:
    """The per-connection hooks, for one accepted association (at EVT_CONN_OPEN)."""
    report = _installed if _installed is not None else check()
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    if sock is not None and report.active(PDU_READER):
        socket_reader.install(sock, limits)
    if report.active(WAKING_QUEUES):
        prepare_wakeups(assoc)


def prepare_wakeups(assoc: Any) -> bool:
    """Give one association's two threads waking queues; False (nothing changed) if
    pynetdicom's objects do not look as expected, so that it polls as before."""
    dul: Any = getattr(assoc, "dul", None)
    dimse: Any = getattr(assoc, "dimse", None)
    raw = getattr(getattr(dul, "socket", None), "socket", None)
    if not (
        all(isinstance(thread, threading.Thread) for thread in (dul, assoc))
        and isinstance(raw, socket.socket)
        and type(getattr(dul, "to_provider_queue", None)) is queue.Queue
        and type(getattr(dimse, "msg_queue", None)) is queue.Queue
        and dul.to_provider_queue.empty()
        and dimse.msg_queue.empty()
    ):
        return False
    socket_waiter = wakeups.SocketWaiter(raw)
    event_waiter = wakeups.EventWaiter()
    dul.to_provider_queue = wakeups.WakingQueue(socket_waiter.wake)
    dimse.msg_queue = wakeups.WakingQueue(event_waiter.wake)
    wakeups.prepare(dul, socket_waiter)
    wakeups.prepare(assoc, event_waiter)
    return True
