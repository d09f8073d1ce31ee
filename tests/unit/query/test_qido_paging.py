"""QIDO-RS paging against a real HTTP server on loopback that pages well, or badly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from stowaway.dicomweb.client import DicomwebError, DicomwebReader, ReaderConfig

TOTAL = 7


class _Store(ThreadingHTTPServer):
    mode = "honest"
    requests: list[dict[str, list[str]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Store

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        self.server.requests.append(query)
        limit = int(query["limit"][0]) if self.server.mode != "no-limit" else TOTAL
        offset = int(query["offset"][0]) if self.server.mode != "no-offset" else 0
        items = [{"00080018": {"vr": "UI", "Value": [f"1.2.{n}"]}} for n in range(TOTAL)]
        body = json.dumps(items[offset : offset + limit]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def store() -> Iterator[_Store]:
    server = _Store(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def reader(store: _Store) -> DicomwebReader:
    return DicomwebReader(ReaderConfig(f"http://127.0.0.1:{store.server_address[1]}/dw"), None)


def uids(pages: Iterator[list[dict[str, object]]]) -> list[str]:
    return [str(item["00080018"]["Value"][0]) for page in pages for item in page]  # type: ignore[index]


def test_pages_cover_every_result_once(store: _Store) -> None:
    assert uids(reader(store).search("instances", [], page_size=3)) == [
        f"1.2.{n}" for n in range(TOTAL)
    ]
    assert [q["offset"] for q in store.requests] == [["0"], ["3"], ["6"]]


def test_a_page_is_fetched_only_when_asked_for(store: _Store) -> None:
    pages = reader(store).search("instances", [], page_size=3)
    next(pages)
    assert len(store.requests) == 1


def test_a_store_ignoring_limit_is_read_in_one_page(store: _Store) -> None:
    store.mode = "no-limit"
    assert len(uids(reader(store).search("instances", [], page_size=3))) == TOTAL
    assert len(store.requests) == 1


def test_a_store_ignoring_offset_is_an_error_not_an_endless_loop(store: _Store) -> None:
    store.mode = "no-offset"
    with pytest.raises(DicomwebError, match="offset"):
        uids(reader(store).search("instances", [], page_size=3))


def test_fuzzy_matching_and_wildcards_go_as_they_are(store: _Store) -> None:
    config = ReaderConfig(f"http://127.0.0.1:{store.server_address[1]}/dw", fuzzy_matching=True)
    list(DicomwebReader(config, None).search("studies", [("00100010", "Sm?th*")], page_size=50))
    [query] = store.requests
    assert query["fuzzymatching"] == ["true"]
    assert query["00100010"] == ["Sm?th*"]
