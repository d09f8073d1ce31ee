"""stowaway.logs: one JSON object (or key=value line) per event, with the event's fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stowaway.db.models import Status
from stowaway.logs import JsonFormatter, KeyValueFormatter, configure_logging

UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A logger writing JSON to a buffer (the root logger is left alone)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("stowaway.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield buffer
    logger.removeHandler(handler)
    logger.propagate = True


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_line_has_severity_time_event_and_the_fields(stream: io.StringIO) -> None:
    log = logging.getLogger("stowaway.test_logs")
    fields = {"sop_instance_uid": UID, "row_id": 42, "outcome": "success", "attempt": 3}
    log.info("instance_forwarded", extra=fields)
    [entry] = lines(stream)
    assert entry["severity"] == "INFO"
    assert entry["event"] == entry["message"] == "instance_forwarded"
    assert entry["logger"] == "stowaway.test_logs"
    assert {k: entry[k] for k in fields} == fields
    assert isinstance(entry["row_id"], int) and isinstance(entry["attempt"], int)
    stamp = datetime.fromisoformat(entry["time"])
    assert entry["time"].endswith("Z") and stamp.utcoffset() is not None
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
    ],
)
def test_severity_uses_cloud_logging_names(stream: io.StringIO, level: int, severity: str) -> None:
    logging.getLogger("stowaway.test_logs").log(level, "something")
    assert lines(stream)[0]["severity"] == severity


def test_values_that_are_not_json_are_written_readably(stream: io.StringIO) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    logging.getLogger("stowaway.test_logs").info(
        "odd_values",
        extra={
            "next_attempt_at": when,
            "path": Path("/data/spool"),
            "status": Status.PENDING,
            "raw": b"\xffabc",
            "aets": {"B", "A"},
        },
    )
    [entry] = lines(stream)
    assert entry["next_attempt_at"] == "2026-01-02T03:04:05+00:00"
    assert entry["path"] == "/data/spool"
    assert entry["status"] == "pending"
    assert entry["raw"].endswith("abc")
    assert entry["aets"] == ["A", "B"]


def test_one_line_per_event_even_with_newlines_and_a_traceback(stream: io.StringIO) -> None:
    log = logging.getLogger("stowaway.test_logs")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("store_unexpected_error", extra={"error": "a\nb"})
    text = stream.getvalue()
    assert text.count("\n") == 1
    [entry] = lines(stream)
    assert entry["severity"] == "ERROR"
    assert entry["error"] == "a\nb"
    assert "RuntimeError: boom" in entry["exception"]
    assert "Traceback" in entry["exception"]


def test_fields_never_shadow_the_standard_keys(stream: io.StringIO) -> None:
    logging.getLogger("stowaway.test_logs").warning(
        "shadowing", extra={"severity": "fake", "time": "then", "event": "other"}
    )
    [entry] = lines(stream)
    assert entry["severity"] == "WARNING" and entry["event"] == "shadowing"
    assert entry["field_severity"] == "fake"
    assert entry["field_time"] == "then"
    assert entry["field_event"] == "other"


def test_secret_fields_are_masked_in_both_formats(stream: io.StringIO) -> None:
    log = logging.getLogger("stowaway.test_logs")
    extra = {"bearer_token": "abc.def", "basic_password": "hunter2", "row_id": 1}
    log.info("auth_configured", extra=extra)
    [entry] = lines(stream)
    assert entry["bearer_token"] == entry["basic_password"] == "***"
    assert "hunter2" not in stream.getvalue() and "abc.def" not in stream.getvalue()
    record = logging.LogRecord("stowaway", logging.INFO, __file__, 1, "auth_configured", None, None)
    record.__dict__.update(extra)
    text = KeyValueFormatter().format(record)
    assert "hunter2" not in text and "bearer_token=***" in text and "row_id=1" in text


def test_key_value_format_quotes_values_with_spaces() -> None:
    record = logging.LogRecord(
        "stowaway", logging.WARNING, __file__, 1, "store_refused", None, None
    )
    record.__dict__.update({"sop_instance_uid": UID, "reason": "Out of disk space", "empty": ""})
    text = KeyValueFormatter().format(record)
    assert " warning stowaway store_refused " in text
    assert f"sop_instance_uid={UID}" in text
    assert 'reason="Out of disk space"' in text and 'empty=""' in text
    assert "\n" not in text


def test_configure_logging_json_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
    try:
        configure_logging("info", "json")
        logging.getLogger("stowaway.receiver").info(
            "instance_stored", extra={"sop_instance_uid": UID, "row_id": 7}
        )
        logging.getLogger("stowaway").debug("hidden_at_info")
        logging.getLogger("pynetdicom").info("pdu noise")
        for handler in root.handlers:
            handler.flush()
        err = capsys.readouterr().err
    finally:
        root.handlers[:], level, pyn = saved
        root.setLevel(level)
        logging.getLogger("pynetdicom").setLevel(pyn)
    entries = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in entries] == ["instance_stored"]
    assert entries[0]["sop_instance_uid"] == UID and entries[0]["row_id"] == 7
