"""The pynetdicom hooks check the shape they expect, say which took, and fall back loudly."""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import association, dimse_messages, dul
from pynetdicom.transport import AssociationSocket

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from stowaway.receiver import incoming, pynetdicom_hooks
from stowaway.receiver.pynetdicom_hooks import (
    CHUNKED_FILE,
    FILE_META,
    PDU_READER,
    WAKING_CLOCK,
    WAKING_QUEUES,
)
from stowaway.receiver.scp import Receiver, ReceiverConfig
from stowaway.receiver.store import StoreHandler
from tests.support import scu
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct

EVERY_HOOK = [CHUNKED_FILE, FILE_META, WAKING_CLOCK, PDU_READER, WAKING_QUEUES]


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the hooks are the receiver's, whatever the queue database."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


@pytest.fixture(autouse=True)
def restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test installs is undone after it."""
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))
    for module in (dul, association):
        monkeypatch.setattr(module, "time", module.time)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setattr(pynetdicom_hooks, "_installed", None)
    monkeypatch.setattr(incoming, "_directory", incoming._directory)


def fell_back(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "hook", ""))
        for r in caplog.records
        if r.getMessage() == "pynetdicom_hook_fell_back" and r.levelno == logging.WARNING
    ]


def test_every_hook_takes_on_the_installed_pynetdicom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert [h.name for h in pynetdicom_hooks.check().hooks] == EVERY_HOOK
    with caplog.at_level(logging.INFO, "stowaway.receiver"):
        report = pynetdicom_hooks.install(str(tmp_path))
    assert report.all_active, report.summary()
    assert fell_back(caplog) == []
    assert (
        report.summary() == f"pynetdicom {pynetdicom.__version__}: active {', '.join(EVERY_HOOK)}"
    )
    assert dimse_messages.NamedTemporaryFile is incoming.new_incoming_file
    # Installing twice (two receivers in one process) still reports every hook as taken.
    assert pynetdicom_hooks.install(str(tmp_path)).all_active


def test_a_missing_target_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(dimse_messages, "create_file_meta")
    monkeypatch.delattr(dul.DULServiceProvider, "_read_pdu_data")
    with caplog.at_level(logging.INFO, "stowaway.receiver"):
        report = pynetdicom_hooks.install(str(tmp_path))
    assert not report.active(FILE_META) and not report.active(PDU_READER)
    assert report.active(CHUNKED_FILE) and report.active(WAKING_CLOCK)
    assert sorted(fell_back(caplog)) == [FILE_META, PDU_READER]
    assert "fell back: file_meta (dimse_messages.create_file_meta is not pynetdicom's)" in (
        report.summary()
    )
    assert not hasattr(dimse_messages, "create_file_meta")  # nothing installed in its place


@pytest.mark.parametrize(
    ("hook", "target", "name", "replacement"),
    [
        (PDU_READER, AssociationSocket, "recv", lambda self, n, flags=0: b""),
        (WAKING_CLOCK, dul, "time", object()),
        (FILE_META, dimse_messages, "write_file_meta_info", lambda fp, meta: None),
    ],
)
def test_a_target_of_the_wrong_shape_falls_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    hook: str,
    target: object,
    name: str,
    replacement: object,
) -> None:
    monkeypatch.setattr(target, name, replacement)
    with caplog.at_level(logging.INFO, "stowaway.receiver"):
        report = pynetdicom_hooks.install(str(tmp_path))
    assert [h.name for h in report.hooks if not h.active] == [hook]
    assert fell_back(caplog) == [hook]
    assert getattr(target, name) is replacement  # left as it was


def test_the_receiver_still_stores_when_the_file_hook_falls_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    spool: Spool,
    queue: Queue,
) -> None:
    # Not the standard library's function any more: pynetdicom's own files, then a copy.
    wrapped = functools.partial(tempfile.NamedTemporaryFile)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", wrapped)
    receiver = Receiver(
        ReceiverConfig(host="127.0.0.1", port=0),
        StoreHandler(spool, queue),
        str(spool.incoming_dir),
    )
    with caplog.at_level(logging.INFO, "stowaway.receiver"):
        receiver.start()
    try:
        assert receiver.hooks is not None and not receiver.hooks.active(CHUNKED_FILE)
        assert fell_back(caplog) == [CHUNKED_FILE]
        assert tempfile.tempdir == str(spool.incoming_dir)  # pynetdicom's files on the volume
        assert scu.send(receiver.port, make_ct(tmp_path / "ct.dcm"), calling="FALLBACK") == "stored"
    finally:
        receiver.stop(1)
        receiver.ae.shutdown()
    rows = queue.rows()
    assert len(rows) == 1
    assert spool.verify(rows[0].spool_path, rows[0].size_bytes, rows[0].sha256) is None


def test_check_prints_one_line_for_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    from stowaway.preflight import check_pynetdicom_hooks

    line = check_pynetdicom_hooks().line()
    assert line.startswith("ok   pynetdicom hooks: pynetdicom ")
    assert "pdu_reader" in line
    monkeypatch.setattr(dul, "time", object())
    line = check_pynetdicom_hooks().line()
    assert line.startswith("WARN pynetdicom hooks: ")
    assert "fell back: waking_clock (pynetdicom.dul.time is not the time module)" in line
