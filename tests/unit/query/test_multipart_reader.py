"""WADO-RS multipart bodies taken apart as they arrive, whatever the chunking."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import pytest

from stowaway.dicomweb.multipart import MultipartError, boundary_of, read_parts

BOUNDARY = b"b0undary-42"


def body(parts: list[bytes], *, preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def chunked(data: bytes, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    position = 0
    while position < len(data):
        size = rng.randint(1, 40)
        yield data[position : position + size]
        position += size


def collect(chunks: Iterator[bytes]) -> tuple[list[bytes], list[Mapping[str, str]]]:
    sinks: list[io.BytesIO] = []
    headers: list[Mapping[str, str]] = []

    def open_part(found: Mapping[str, str]) -> BinaryIO:
        headers.append(found)
        sinks.append(io.BytesIO())
        return sinks[-1]

    count = read_parts(chunks, BOUNDARY, open_part)
    assert count == len(sinks)
    return [s.getvalue() for s in sinks], headers


@pytest.mark.parametrize("seed", range(20))
def test_parts_are_exact_whatever_the_chunk_boundaries(seed: int) -> None:
    # Content that nearly contains the delimiter, and CRLFs at the edges.
    parts = [b"\r\n--b0undary-4\r\nDICM" * 5, b"", b"x" * 333 + b"\r\n"]
    got, headers = collect(chunked(body(parts, preamble=b"ignored preamble\r\n"), seed))
    assert got == parts
    assert [h["content-type"] for h in headers] == ["application/dicom"] * 3


def test_a_body_cut_before_its_closing_boundary_is_an_error() -> None:
    data = body([b"abc"])
    with pytest.raises(MultipartError, match="ended"):
        collect(iter([data[: len(data) - 10]]))


def test_endless_part_headers_are_refused() -> None:
    data = b"--" + BOUNDARY + b"\r\nX-Junk: " + b"a" * 100_000
    with pytest.raises(MultipartError, match="headers"):
        collect(iter([data]))


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom"; boundary=b0undary-42',
        'multipart/related; boundary="b0undary-42"; type="application/dicom"',
    ],
)
def test_boundary_from_content_type(content_type: str) -> None:
    assert boundary_of(content_type) == BOUNDARY


def test_a_non_multipart_content_type_is_refused() -> None:
    with pytest.raises(MultipartError):
        boundary_of("application/json")
