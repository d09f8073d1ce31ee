"""pynetdicom internals the query/retrieve service relies on; only this module touches them.

* ``DIMSEMessage.command_set`` / ``_set_command_group_length`` (:class:`FinalStatuses`):
  pynetdicom's C-MOVE/C-GET protocol can fail before any sub-operation only with a bare
  0xA801 (C-MOVE) or a zero-count Success (C-GET); the handler records the status and
  ErrorComment it means and an EVT_DIMSE_SENT handler, bound on that association only
  (pynetdicom calls it with the message before encoding it), writes them into that one
  final response.
* ``Association._ae`` and ``AE.associate`` reading the calling AE title from
  ``self.ae_title`` (:func:`sub_operation_ae`): for ``--dimse_cmove_aet``, while pynetdicom
  opens a C-MOVE's association, the association being served belongs to a stand-in AE
  that differs from the real one in its title only.
* ``Association.send_c_store`` accepting a file path, sent in pieces with
  ``_config.STORE_SEND_CHUNKED_DATASET`` (:func:`send_from_file`): pynetdicom would encode
  each yielded dataset again, whole, in memory.
* ``_config.LOG_REQUEST_IDENTIFIERS`` / ``LOG_RESPONSE_IDENTIFIERS``: off.

The query/retrieve integration tests exercise each of them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from pydicom.dataset import Dataset, FileDataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

C_GET_RSP: Final = 0x8010
C_MOVE_RSP: Final = 0x8021


class FinalStatuses:
    """The status and ErrorComment a C-MOVE/C-GET's final response must carry instead of
    pynetdicom's, by association and message."""

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int], tuple[int, str]] = {}
        self._lock = threading.Lock()

    def amend(self, event: Event, status: Dataset) -> None:
        """The final response to ``event``'s request carries ``status`` (Status, ErrorComment)."""
        # Bound on this association only: others never pay for the hook.
        event.assoc.bind(evt.EVT_DIMSE_SENT, self.on_dimse_sent)
        with self._lock:
            self._pending[_request_key(event)] = (int(status.Status), str(status.ErrorComment))

    def forget(self, event: Event) -> None:
        """pynetdicom's own final response is right after all."""
        with self._lock:
            self._pending.pop(_request_key(event), None)

    def on_dimse_sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT: put a recorded status and ErrorComment into its final response."""
        if not self._pending:
            return
        message = event.message
        command = message.command_set
        if command.get("CommandField") not in (C_MOVE_RSP, C_GET_RSP):
            return
        key = (id(event.assoc), int(command.MessageIDBeingRespondedTo))
        with self._lock:
            amendment = self._pending.pop(key, None)
        if amendment is None:
            return
        command.Status, command.ErrorComment = amendment
        message._set_command_group_length()


def _request_key(event: Event) -> tuple[int, int]:
    """Which request on which association."""
    return id(event.assoc), int(event.request.MessageID or 0)


# The file sender passes paths: pynetdicom then reads them in pieces, not whole.
_config.STORE_SEND_CHUNKED_DATASET = True
# Identifiers hold patient names and IDs: pynetdicom must not log them, at any level.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


def send_from_file(assoc: Association) -> Callable[..., Dataset]:
    """``assoc.send_c_store`` that sends a dataset read from a file as that file's bytes.

    pynetdicom's C-MOVE/C-GET services hand it the dataset a handler yielded and would
    encode it again, whole, in memory (about three times its size at the peak). Sent from
    the file it is byte for byte what the store returned, read in pieces (pynetdicom still
    queues a message's PDUs faster than the socket takes them: about one instance's size
    at the peak). When no accepted context has the file's transfer syntax, the dataset goes
    as pynetdicom sends it, converted (Explicit to Implicit VR Little Endian, say).
    """
    original = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        path = getattr(dataset, "filename", None) if isinstance(dataset, FileDataset) else None
        if isinstance(path, str):
            try:
                return original(path, *args, **kwargs)
            except ValueError:  # no context for the syntax as stored
                pass
        return original(dataset, *args, **kwargs)

    return send_c_store


@contextlib.contextmanager
def sending_files(assoc: Association) -> Iterator[None]:
    """While C-GET's sub-operations run on ``assoc``, they are sent from their files."""
    assoc.send_c_store = send_from_file(assoc)  # type: ignore[method-assign]
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del assoc.send_c_store  # back to the class's method


class SubOperationAE:
    """Stands in for the receiver's AE while pynetdicom opens a C-MOVE's association.

    ``AE.associate`` takes the calling AE title from ``self.ae_title`` and everything else
    from the AE, so the stand-in differs in its title only (``--dimse_cmove_aet``); the
    association it opens sends its C-STOREs from their files.
    """

    def __init__(self, ae: AE, title: str) -> None:
        self._real = ae
        self.ae_title = title

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def associate(self, *args: Any, **kwargs: Any) -> Association:
        assoc = AE.associate(self, *args, **kwargs)  # type: ignore[arg-type]
        assoc.send_c_store = send_from_file(assoc)  # type: ignore[method-assign]
        return assoc


@contextlib.contextmanager
def sub_operation_ae(assoc: Association, title: str | None) -> Iterator[None]:
    """While pynetdicom opens the C-MOVE association (``title``: its calling AE title)."""
    real = assoc._ae
    assoc._ae = SubOperationAE(real, title or real.ae_title)  # type: ignore[assignment]
    try:
        yield
    finally:
        assoc._ae = real
