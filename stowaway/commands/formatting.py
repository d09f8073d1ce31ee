"""How the subcommands (and the health endpoint) show things: sizes, times, tables, JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from stowaway.db.models import utcnow

_BYTE_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def human_bytes(size: float) -> str:
    """``512 bytes``, ``1.5 KiB`` ... ``2.0 TiB`` (binary units, one decimal)."""
    value = float(size)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(seconds: float) -> str:
    """A rounded age in the largest unit that still reads as two or more: ``90s``, ``5m``,
    ``3h``, ``2d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def ago(value: datetime) -> str:
    """How long before now ``value`` was: ``5m ago``."""
    return f"{age_text(max(0.0, (utcnow() - value).total_seconds()))} ago"


def timestamp(value: datetime | None) -> str:
    """``2026-01-31 08:00:00``, or ``-`` for none."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def shorten(text: str | None, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (anything JSON lacks, as its ``str``)."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


class Progress:
    """``label done/total`` on one stderr line, only on a terminal and not in --json mode."""

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.total = total
        self.enabled = enabled and self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        self._shown = True
        self.stream.write(f"\r{self.label} {done}/{self.total}")
        self.stream.flush()

    def follow(self, done: int, total: int) -> None:
        """An ``on_progress(done, total)`` callback for the shared operations."""
        self.total = total
        self.update(done)

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
