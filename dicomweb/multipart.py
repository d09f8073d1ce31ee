"""An incremental reader of ``multipart/related`` bodies (RFC 2046), as WADO-RS sends them.

The body arrives in chunks; each part's content goes to a sink as it arrives, so no part,
and never the whole response, is held in memory: the reader keeps at most one chunk plus
the length of the boundary delimiter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import BinaryIO, Final

#: Part headers longer than this are refused (a hostile or broken server).
MAX_HEADER_BYTES: Final = 16 * 1024


class MultipartError(ValueError):
    """The body is not the multipart/related message it claims to be."""


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` parameter of a ``multipart/...`` Content-Type header."""
    match = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.I)
    if not content_type.lower().lstrip().startswith("multipart/") or not match:
        raise MultipartError(f"not a multipart body with a boundary: {content_type[:100]!r}")
    return (match.group(1) or match.group(2)).encode("latin-1")


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def read_parts(
    chunks: Iterable[bytes],
    boundary: bytes,
    open_part: Callable[[Mapping[str, str]], BinaryIO],
) -> int:
    """Write each part's content to the sink ``open_part(headers)`` returns; the count of parts.

    Header names are lower case. The caller owns the sinks (opens, closes, removes them).
    """
    # A leading CRLF makes the first delimiter look like every other one.
    delimiter = b"\r\n--" + boundary
    buffer = b"\r\n"
    state = "preamble"
    sink: BinaryIO | None = None
    parts = 0
    source = iter(chunks)
    finished = False
    while True:
        progressed = True
        while progressed:
            progressed = False
            if state in ("preamble", "body"):
                index = buffer.find(delimiter)
                if index >= 0:
                    if sink is not None:
                        sink.write(buffer[:index])
                        sink = None
                    buffer = buffer[index + len(delimiter) :]
                    state, progressed = "after_delimiter", True
                else:
                    keep = len(delimiter) - 1
                    if sink is not None and len(buffer) > keep:
                        sink.write(buffer[:-keep])
                    if len(buffer) > keep:
                        buffer = buffer[-keep:]
            elif state == "after_delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    return parts
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("no line end after a boundary delimiter")
                    break
                buffer = buffer[end + 2 :]  # transport padding, then the CRLF
                state, progressed = "headers", True
            elif state == "headers":
                end = buffer.find(b"\r\n\r\n")
                if buffer.startswith(b"\r\n"):
                    end, skip = 0, 2  # a part without headers
                else:
                    skip = 4
                if end < 0:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
                    break
                headers = _headers(buffer[:end])
                buffer = buffer[end + skip :]
                sink = open_part(headers)
                parts += 1
                state, progressed = "body", True
        if finished:
            raise MultipartError("the body ended before its closing boundary")
        chunk = next(source, None)
        if chunk is None:
            finished = True
            continue
        buffer += chunk
