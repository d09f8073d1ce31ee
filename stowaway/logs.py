"""Structured logging: one event per line, key=value text or JSON.

Code logs an event name as the message and its fields as ``extra``::

    log.info("instance_stored", extra={"sop_instance_uid": uid, "row_id": 7})

With ``--log-format json`` each line is one JSON object::

    {"time": "2025-01-02T03:04:05.678901Z", "severity": "INFO", "logger": "stowaway.forwarder",
     "event": "instance_forwarded", "message": "instance_forwarded", "row_id": 7,
     "sop_instance_uid": "1.2.3", "outcome": "success", "attempt": 1}

``severity`` and ``time`` are the names Cloud Logging reads, and ``message``
(the event again) is what its log viewer shows as the summary line. A field
that would shadow one of these keys is written with a ``field_`` prefix.
Fields whose names suggest a secret are masked, whatever their value.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_SECRET_WORDS = ("token", "password", "secret", "authorization", "credential", "key")
_SEVERITY = {"WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL", "DEBUG": "DEBUG"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = {}
    for name, value in record.__dict__.items():
        if name in _STANDARD or name.startswith("_"):
            continue
        if any(word in name.lower() for word in _SECRET_WORDS):
            value = "***"
        out[name] = value
    return out


def _json_value(value: Any) -> Any:
    """``json.dumps`` fallback: times in ISO 8601, everything else as its text."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``severity`` and ``time`` are what Cloud Logging reads."""

    def format(self, record: logging.LogRecord) -> str:
        event = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "severity": _SEVERITY.get(record.levelname, "INFO"),
            "logger": record.name,
            "event": event,
            "message": event,
        }
        for name, value in _fields(record).items():
            entry[f"field_{name}" if name in entry else name] = value
        if record.exc_info:
            # Error Reporting picks up a stack trace from this field.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=_json_value)


class KeyValueFormatter(logging.Formatter):
    """``time level logger event key=value ...``, values quoted when needed."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            record.levelname.lower(),
            record.name,
            record.getMessage(),
        ]
        for name, value in _fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' ="\n'):
                text = json.dumps(text)
            parts.append(f"{name}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at debug and a lot at info; keep it to warnings
    # unless we are debugging.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "debug" else "WARNING")
    for noisy in ("urllib3", "google", "alembic"):
        logging.getLogger(noisy).setLevel("WARNING")
