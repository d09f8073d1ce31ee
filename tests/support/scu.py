"""A pynetdicom sender for tests that expect to be refused.

pynetdicom's requestor leaks its socket when the peer closes the connection before
the association is established (its ``_shutdown_socket`` skips ``close()`` once
``shutdown()`` raised), which ``filterwarnings = error`` turns into a failure in some
later test. :func:`associate` keeps a reference to every socket it opens, plain or
TLS, and :func:`closing` closes them whatever happened.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

__all__ = ["Outcome", "associate", "send"]


class _Sockets:
    def __init__(self) -> None:
        self.open: list[socket.socket] = []

    def on_open(self, event: Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if isinstance(sock, socket.socket):
            self.open.append(sock)

    def close(self) -> None:
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.close()


class _ClosingContext(ssl.SSLContext):
    """Remembers the sockets it wraps: a failed handshake never reaches EVT_CONN_OPEN."""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.__dict__.setdefault("wrapped", []).append(sock)
        return sock


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting ``ca``, presenting ``cert``/``key`` when given."""
    context = _ClosingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@contextlib.contextmanager
def associate(
    port: int,
    *,
    calling: str = "PYSCU",
    called: str = "IMPORTADAPTER",
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
    contexts: list[tuple[str, str]] | None = None,
    timeout: float = 10,
) -> Iterator[Association]:
    """An association to 127.0.0.1:``port`` (maybe not established); always cleaned up."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for abstract, transfer in contexts or [("1.2.840.10008.1.1", "1.2.840.10008.1.2")]:
        ae.add_requested_context(abstract, transfer)
    sockets = _Sockets()
    try:
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title=called,
            bind_address=(source, 0) if source else None,
            tls_args=(tls, "127.0.0.1") if tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, sockets.on_open)],
        )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            if assoc.is_alive():
                assoc.join(timeout)
    finally:
        sockets.close()
        for sock in tls.__dict__.get("wrapped", []) if tls is not None else []:
            with contextlib.suppress(OSError):
                sock.close()


class Outcome(str):
    """``stored``, ``status 0x....``, ``rejected 0x..`` (diagnostic) or ``no association``."""


def send(
    port: int,
    dicom: Path,
    *,
    calling: str = "PYSCU",
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> Outcome:
    """One C-STORE of ``dicom``; what happened, as a short string."""
    ds = pydicom.dcmread(dicom)
    context = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))]
    with associate(port, calling=calling, source=source, tls=tls, contexts=context) as assoc:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            return Outcome(f"rejected {getattr(primitive, 'diagnostic', 0):#x}")
        if not assoc.is_established:
            return Outcome("no association")
        status = assoc.send_c_store(ds)
        code = int(status.Status) if "Status" in status else -1
    return Outcome("stored" if code == 0 else f"status {code:#06x}")
