"""Compress native pixel data on the way out, one frame at a time.

Targets (pydicom 3 encoders with maintained plugins):

| target | UID | encoder |
|---|---|---|
| RLE Lossless | 1.2.840.10008.1.2.5 | pydicom itself |
| JPEG-LS Lossless | 1.2.840.10008.1.2.4.80 | pyjpegls |
| JPEG 2000 Lossless | 1.2.840.10008.1.2.4.90 | pylibjpeg + pylibjpeg-openjpeg |
| JPEG-LS Near-Lossless (lossy) | 1.2.840.10008.1.2.4.81 | pyjpegls, needs ``jls_error`` |
| JPEG 2000 (lossy) | 1.2.840.10008.1.2.4.91 | pylibjpeg-openjpeg, needs ``j2k_psnr``/``j2k_cr`` |

A lossy target is used only when named with its quality setting. JPEG Baseline (.50),
Google's other target, is refused at start-up: pydicom has no encoder for it.

An instance that cannot be transcoded (already compressed, big endian, float or 1-bit
pixels, a photometric interpretation the encoder refuses...) is not an error: ``transcode``
returns ``applied=False`` with the reason and the caller sends the original.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from stowaway.forwarder.deidentify.layout import (
    Part10Layout,
    UnsupportedInstance,
    file_start,
    read_layout,
)
from stowaway.text import first_line

__all__ = [
    "TARGETS",
    "TranscodeConfigError",
    "TranscodeResult",
    "TranscodeTarget",
    "transcode",
]

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


@dataclass(frozen=True)
class _Syntax:
    uid: UID
    package: str
    lossy_options: tuple[str, ...] = ()  # empty: lossless
    lossy_method: str = ""  # LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1)


TARGETS: dict[UID, _Syntax] = {
    s.uid: s
    for s in (
        _Syntax(RLELossless, "pydicom"),
        _Syntax(JPEGLSLossless, "pyjpegls"),
        _Syntax(JPEG2000Lossless, "pylibjpeg-openjpeg"),
        _Syntax(JPEGLSNearLossless, "pyjpegls", ("jls_error",), "ISO_14495_1"),
        _Syntax(JPEG2000, "pylibjpeg-openjpeg", ("j2k_psnr", "j2k_cr"), "ISO_15444_1"),
    )
}
_REFUSED = {
    "1.2.840.10008.1.2.4.50": "pydicom has no JPEG Baseline encoder (Pillow's covers 8-bit "
    "data only and GDCM transcodes whole files in memory)",
}


class TranscodeConfigError(ValueError):
    """A ``transcode`` setting that cannot work (one line, names the setting)."""


@dataclass(frozen=True)
class TranscodeTarget:
    """A transfer syntax to compress to, with its lossy quality if it is a lossy one."""

    uid: UID
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lossy(self) -> bool:
        return bool(TARGETS[self.uid].lossy_options)

    @classmethod
    def from_config(cls, value: object, where: str = "transcode") -> TranscodeTarget:
        """From ``"1.2.840.10008.1.2.4.90"`` (or its pydicom keyword ``JPEG2000Lossless``),
        or ``{"syntax": "1.2.840.10008.1.2.4.91", "j2k_psnr": 45}`` for a lossy one."""
        options: dict[str, Any] = {}
        if isinstance(value, Mapping):
            options = {k: v for k, v in value.items() if k != "syntax"}
            value = value.get("syntax")
        if not isinstance(value, str) or not value:
            raise TranscodeConfigError(f"{where}: give a transfer syntax UID")
        uid = UID(value) if value[0].isdigit() else _uid_for_keyword(value, where)
        if uid in _REFUSED:
            raise TranscodeConfigError(
                f"{where}: {uid.name} ({uid}) is not supported: {_REFUSED[uid]}; "
                f"use {JPEG2000Lossless} (JPEG 2000 Lossless) or {JPEGLSLossless} (JPEG-LS)"
            )
        syntax = TARGETS.get(uid)
        if syntax is None:
            supported = ", ".join(str(u) for u in TARGETS)
            raise TranscodeConfigError(f"{where}: {value} is not one of {supported}")
        unknown = sorted(set(options) - set(syntax.lossy_options))
        if unknown:
            raise TranscodeConfigError(f"{where}: {unknown[0]!r} does not apply to {uid.name}")
        if syntax.lossy_options and not options:
            wanted = " or ".join(syntax.lossy_options)
            raise TranscodeConfigError(
                f"{where}: {uid.name} is lossy: name its quality ({wanted}) to have it"
            )
        if len(options) > 1:
            raise TranscodeConfigError(f"{where}: give one of {', '.join(sorted(options))}")
        encoder = get_encoder(uid)
        if not encoder.is_available:
            raise TranscodeConfigError(
                f"{where}: {uid.name} needs the Python package {syntax.package}"
            )
        normalized = {k: ([v] if k.startswith("j2k") else v) for k, v in options.items()}
        return cls(uid, normalized)


def _uid_for_keyword(keyword: str, where: str) -> UID:
    import pydicom.uid

    found = getattr(pydicom.uid, keyword, None)
    if not isinstance(found, UID):
        raise TranscodeConfigError(f"{where}: {keyword!r} is not a transfer syntax")
    return found


@dataclass(frozen=True)
class TranscodeResult:
    """What ``transcode`` did: ``applied`` and the written file, or the reason it did not."""

    applied: bool
    transfer_syntax: str  # of what is to be sent
    reason: str | None = None
    frames: int = 0
    ratio: float | None = None  # original / compressed pixel bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "applied": self.applied,
            "transfer_syntax": self.transfer_syntax,
            "reason": self.reason,
            "frames": self.frames,
            "ratio": self.ratio,
        }


class _Skip(Exception):
    """The instance goes as received, for this reason."""


def _frame_geometry(layout: Part10Layout, target: UID) -> tuple[int, int, dict[str, Any]]:
    """(frames, bytes per frame, encoder keyword arguments) or ``_Skip``."""
    pixel, ds = layout.pixel, layout.header
    if pixel is None:
        raise _Skip("no pixel data")
    if layout.transfer_syntax == target:
        raise _Skip("already in the target transfer syntax")
    if layout.transfer_syntax.is_compressed:
        raise _Skip(f"already compressed ({layout.transfer_syntax.name})")
    if not layout.little_endian:
        raise _Skip("big endian pixel data")
    if pixel.tag != _PIXEL_DATA:
        raise _Skip("float pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        kwargs = {
            "rows": rows,
            "columns": columns,
            "samples_per_pixel": samples,
            "bits_allocated": bits,
            "bits_stored": int(ds.BitsStored),
            "pixel_representation": int(ds.PixelRepresentation),
            "photometric_interpretation": str(ds.PhotometricInterpretation),
            "planar_configuration": int(ds.get("PlanarConfiguration", 0) or 0),
            "number_of_frames": 1,
        }
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise _Skip(f"incomplete Image Pixel module: {first_line(exc)}") from None
    if bits % 8:
        raise _Skip(f"{bits}-bit pixel data")
    frame_bytes = rows * columns * samples * bits // 8
    expected = frames * frame_bytes
    if pixel.value_length is None or pixel.value_length not in (expected, expected + 1):
        raise _Skip(f"pixel data length {pixel.value_length} is not {frames} frames")
    return frames, frame_bytes, kwargs


def _header_bytes(layout: Part10Layout, target: TranscodeTarget, ratio: float | None) -> bytes:
    ds = layout.header
    if int(ds.get("SamplesPerPixel", 1)) > 1 and target.uid != RLELossless:
        ds.PlanarConfiguration = 0  # JPEG-LS and JPEG 2000 carry interleaved samples
    if target.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = TARGETS[target.uid].lossy_method
        if ratio is not None:
            ds.LossyImageCompressionRatio = f"{ratio:.4g}"
    sop_uid = str(layout.file_meta.get("MediaStorageSOPInstanceUID", ""))
    out = DicomBytesIO()
    out.write(file_start(layout, sop_uid, target.uid))
    out.is_implicit_VR, out.is_little_endian = False, True  # every compressed syntax
    write_dataset(out, ds)
    return out.getvalue()


def _encode_frames(
    src: BinaryIO,
    fragments: BinaryIO,
    layout: Part10Layout,
    frames: int,
    frame_bytes: int,
    encode: Any,
) -> list[int]:
    """Encode each frame into ``fragments`` as an item; returns the items' sizes."""
    assert layout.pixel is not None
    sizes = []
    for index in range(frames):
        src.seek(layout.pixel.value_offset + index * frame_bytes)
        raw = src.read(frame_bytes)
        if len(raw) != frame_bytes:
            raise _Skip("the pixel data ends early")
        encoded = encode(raw)
        if len(encoded) % 2:
            encoded += b"\x00"  # items have even length
        fragments.write(_ITEM + struct.pack("<L", len(encoded)))
        fragments.write(encoded)
        sizes.append(8 + len(encoded))
    return sizes


def transcode(
    source: Path,
    dest: Path,
    target: TranscodeTarget,
    *,
    context: Mapping[str, object] | None = None,
) -> TranscodeResult:
    """Write ``source`` compressed to ``target`` into ``dest``, frame by frame.

    Returns ``applied=False`` with a reason (and writes nothing) when the instance cannot be
    transcoded; the caller then sends ``source`` as it is. Memory: one raw frame and its
    encoded form at a time, plus the header. ``context`` is added to the
    ``transcode_skipped`` log line (the destination, the row).
    """
    extra = dict(context or {})
    try:
        layout = read_layout(source)
    except UnsupportedInstance as exc:
        return _skipped(source, target, str(exc), "", extra)
    received = str(layout.transfer_syntax)
    try:
        frames, frame_bytes, kwargs = _frame_geometry(layout, target.uid)
    except _Skip as exc:
        return _skipped(source, target, str(exc), received, extra)
    encoder = get_encoder(target.uid)

    def encode(raw: bytes) -> bytes:
        try:
            return bytes(encoder.encode(raw, **kwargs, **target.options))
        except Exception as exc:  # the plugins raise ValueError, RuntimeError, their own
            # pydicom lists the offending values on the lines after the first: keep them
            detail = first_line(" ".join(str(exc).split()) or type(exc).__name__)
            raise _Skip(f"{target.uid.name} encoder: {detail}") from None

    fragments_path = dest.with_name(dest.name + ".frames")
    partial = dest.with_name(dest.name + ".partial")
    try:
        with open(source, "rb") as src, open(fragments_path, "w+b") as fragments:
            sizes = _encode_frames(src, fragments, layout, frames, frame_bytes, encode)
            compressed = sum(sizes) - 8 * len(sizes)
            ratio = (frames * frame_bytes / compressed) if compressed else None
            head = _header_bytes(layout, target, ratio)
            with open(partial, "wb") as out:
                out.write(head)
                out.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00")
                out.write(struct.pack("<L", 0xFFFFFFFF))
                out.write(_basic_offset_table(sizes))
                fragments.seek(0)
                while piece := fragments.read(1 << 20):
                    out.write(piece)
                out.write(_SEQUENCE_DELIMITER)
        os.replace(partial, dest)
    except _Skip as exc:
        return _skipped(source, target, str(exc), received, extra)
    finally:
        for leftover in (fragments_path, partial):
            leftover.unlink(missing_ok=True)
    return TranscodeResult(True, str(target.uid), None, frames, round(ratio, 3) if ratio else None)


def _basic_offset_table(sizes: list[int]) -> bytes:
    """One offset per frame (PS3.5 A.4), empty when an offset would not fit in 32 bits."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size
    if len(sizes) < 2 or offsets[-1] > 0xFFFFFFFF:
        return _ITEM + struct.pack("<L", 0)
    return _ITEM + struct.pack("<L", 4 * len(offsets)) + struct.pack(f"<{len(offsets)}L", *offsets)


def _skipped(
    source: Path,
    target: TranscodeTarget,
    reason: str,
    received: str,
    extra: Mapping[str, object] | None = None,
) -> TranscodeResult:
    log.info(
        "transcode_skipped",
        extra={
            **(extra or {}),
            "target": str(target.uid),
            "reason": reason,
            "spool_file": source.name,
        },
    )
    return TranscodeResult(False, received, reason)
