"""Google's configuration JSON, read as leniently as org.json reads it; the AE dictionary."""

from __future__ import annotations

from pathlib import Path

import pytest

from stowaway.lenient_json import LenientJSONError, loads
from stowaway.receiver.aet_dictionary import (
    ENV_AETS_JSON,
    AetDictionaryError,
    MoveDestination,
    load,
    parse,
)


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "PACS", "host": "10.0.0.5", "port": 11113}]',
        "[{'name': 'PACS', 'host': '10.0.0.5', 'port': 11113}]",
        "[{name: 'PACS', host: '10.0.0.5', port: 11113,},]",
        '[{"name" = "PACS"; "host" => "10.0.0.5"; "port": "11113"}]',
        '// sites\n[{"name": "PACS", /* main */ "host": "10.0.0.5", "port": 11113}]',
    ],
)
def test_google_adapter_dictionaries_load_unchanged(text: str) -> None:
    assert parse(text, "test") == {"PACS": MoveDestination("PACS", "10.0.0.5", 11113)}


def test_lenient_json_still_reads_plain_json() -> None:
    assert loads('{"a": [1, 2.5, true, null, "x\\u00e9\\n"]}') == {
        "a": [1, 2.5, True, None, "x\u00e9\n"]
    }


@pytest.mark.parametrize("text", ["[", "[1 2]", '{"a" 1}', "'open", "[1] x"])
def test_broken_json_names_the_position(text: str) -> None:
    with pytest.raises(LenientJSONError, match="character"):
        loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "A"}', "JSON array"),
        ('[{"name": "A", "host": "h"}]', "entry 1: missing port"),
        ('[{"name": "A", "host": "h", "port": 70000}]', "port must be 1 to 65535"),
        ('[{"name": "WAY-TOO-LONG-AE-TITLE", "host": "h", "port": 1}]', "AE title"),
    ],
)
def test_bad_entries_are_named(text: str, message: str) -> None:
    with pytest.raises(AetDictionaryError, match=message):
        parse(text, "--aet_dictionary_inline")


def test_sources_in_googles_order_inline_then_file_then_variable(tmp_path: Path) -> None:
    def entry(name: str) -> str:
        return f'[{{"name": "{name}", "host": "h", "port": 1}}]'

    path = tmp_path / "aets.json"
    path.write_text(entry("FILE"))
    environ = {ENV_AETS_JSON: entry("ENV")}
    assert set(load(entry("INLINE"), path, environ)) == {"INLINE"}
    assert set(load(None, path, environ)) == {"FILE"}
    assert set(load(None, None, environ)) == {"ENV"}
    assert load(None, None, {}) == {}


def test_unreadable_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(AetDictionaryError, match="--aet_dictionary: cannot read"):
        load(None, tmp_path / "missing.json", {})
