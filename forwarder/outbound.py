"""Make what one destination gets from a spooled instance: redacted, compressed, or both.

The spool file is never changed (its row keeps the original's size and SHA-256). Per
delivery, :meth:`OutboundPipeline.prepare` gives an :class:`PreparedInstance`: the
``UploadItem`` to send (the new UIDs, the new transfer syntax, and a body) and what was
applied, for the row. Order: compress first (from the native pixels of the spool file,
frame by frame, into a scratch file), then redact (the header rewritten, the pixel data
streamed). For STOW-RS the redacted instance is streamed into the request; a DICOM node
is sent a file, so for DIMSE the redacted copy is written to a scratch file first.

An instance that cannot be compressed goes uncompressed (``on_event("transcode_skipped")``
and a log line); one that cannot be redacted is never sent (``RedactionError``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stowaway.forwarder.deidentify import RedactionError, Redactor
from stowaway.forwarder.destinations import Outbound
from stowaway.forwarder.stow import UploadItem
from stowaway.forwarder.transcode import transcode

__all__ = ["OutboundPipeline", "PreparedInstance", "RedactionError"]

log = logging.getLogger("stowaway.forwarder")

#: Events reported to ``on_event`` (the metrics count them per destination).
TRANSCODE_SKIPPED = "transcode_skipped"
REDACTION_FAILED = "redaction_failed"


@dataclass
class PreparedInstance:
    """What goes out for one row, and what was done to get it."""

    item: UploadItem
    #: ``{"redact": {...}, "transcode": {...}}``; None: sent as received
    applied: dict[str, Any] | None = None
    scratch: list[Path] = field(default_factory=list)

    def close(self) -> None:
        """Delete the scratch files (after the upload, whatever its outcome)."""
        for path in self.scratch:
            with contextlib.suppress(OSError):
                path.unlink()
        self.scratch.clear()


class OutboundPipeline:
    """One destination's transforms. Thread-safe: a redactor holds only its spec and key."""

    def __init__(
        self,
        outbound: Outbound,
        scratch_dir: Path,
        *,
        destination: str,
        needs_file: bool,
        on_event: Callable[[str], None] = lambda _e: None,
    ) -> None:
        self.outbound = outbound
        self.scratch_dir = scratch_dir
        self.destination = destination
        self.needs_file = needs_file
        self.on_event = on_event
        # Reads the UID key once (UidKeyError at start-up when it cannot).
        self.redactor = Redactor(outbound.redaction) if outbound.redaction is not None else None

    @property
    def active(self) -> bool:
        return self.outbound.changes_instances

    def _scratch(self, suffix: str) -> Path:
        return self.scratch_dir / f"{uuid.uuid4().hex}{suffix}"

    def clear_leftovers(self, older_than: float) -> int:
        """Delete scratch files at least ``older_than`` seconds old (a crashed forwarder's:
        a delivery in hand longer than its lease is not ours any more)."""
        removed, now = 0, time.time()
        with contextlib.suppress(OSError):
            for path in self.scratch_dir.iterdir():
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime >= older_than:
                        path.unlink()
                        removed += 1
        return removed

    def prepare(self, item: UploadItem, row_id: int) -> PreparedInstance:
        """The instance to send for ``item`` (the spooled one). Raises ``RedactionError``
        when it cannot be redacted; the caller must then not send it."""
        if not self.active:
            return PreparedInstance(item)
        self.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        prepared = PreparedInstance(item, {})
        try:
            self._transcode(prepared, row_id)
            self._redact(prepared, row_id)
        except BaseException:
            prepared.close()
            raise
        return prepared

    def _transcode(self, prepared: PreparedInstance, row_id: int) -> None:
        target = self.outbound.transcode
        if target is None:
            return
        assert prepared.applied is not None
        dest = self._scratch(".transcoded")
        prepared.scratch.append(dest)
        context = {"destination": self.destination, "row_id": row_id}
        result = transcode(prepared.item.path, dest, target, context=context)
        prepared.applied["transcode"] = result.as_dict() | {"target": str(target.uid)}
        if not result.applied:
            self.on_event(TRANSCODE_SKIPPED)
            return
        prepared.item = replace(
            prepared.item,
            path=dest,
            size_bytes=dest.stat().st_size,
            transfer_syntax_uid=result.transfer_syntax,
        )

    def _redact(self, prepared: PreparedInstance, row_id: int) -> None:
        if self.redactor is None:
            return
        assert prepared.applied is not None
        try:
            redacted = self.redactor.prepare(prepared.item.path)
        except RedactionError as exc:
            self.on_event(REDACTION_FAILED)
            log.warning(
                REDACTION_FAILED,
                extra={"destination": self.destination, "row_id": row_id, "error": str(exc)},
            )
            raise
        report = redacted.report
        prepared.applied["redact"] = report.as_dict()
        item = replace(
            prepared.item,
            sop_instance_uid=report.sop_instance_uid,
            study_instance_uid=report.study_instance_uid,
            series_instance_uid=report.series_instance_uid,
            transfer_syntax_uid=redacted.transfer_syntax or prepared.item.transfer_syntax_uid,
            size_bytes=redacted.size,
        )
        if self.needs_file:
            out = self._scratch(".redacted")
            prepared.scratch.append(out)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                redacted.write(f)
            prepared.item = replace(item, path=out)
        else:
            prepared.item = replace(item, opener=redacted.open)
