"""Settings: flags, STOWAWAY_* variables, Google's aliases, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stowaway.cli import build_parser
from stowaway.settings import SettingsError, load_settings


def settings_for(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_settings(build_parser().parse_args(argv), env or {})


def test_defaults() -> None:
    s = settings_for(["serve"])
    assert (s.aet, s.port, s.host) == ("IMPORTADAPTER", 2575, "0.0.0.0")
    assert s.data_dir == Path("stowaway-data")
    assert s.db_url == "sqlite:///stowaway-data/queue.db"
    assert s.spool_dir == Path("stowaway-data/spool")


@pytest.mark.parametrize(
    "argv",
    [
        [
            "serve",
            "--dimse_aet=GATEWAY",
            "--dimse_port=4242",
            "--dicomweb_address=https://healthcare.googleapis.com/v1/x/dicomWeb",
        ],
        [
            "serve",
            "--dimse_aet",
            "GATEWAY",
            "--dimse_port",
            "4242",
            "--dicomweb_address",
            "https://healthcare.googleapis.com/v1/x/dicomWeb",
        ],
        [
            "serve",
            "--aet",
            "GATEWAY",
            "--port",
            "4242",
            "--dicomweb-url",
            "https://healthcare.googleapis.com/v1/x/dicomWeb/",
        ],
    ],
)
def test_google_adapter_flags_are_aliases(argv: list[str]) -> None:
    s = settings_for(argv)
    assert s.aet == "GATEWAY"
    assert s.port == 4242
    assert s.dicomweb_url == "https://healthcare.googleapis.com/v1/x/dicomWeb"


def test_environment_then_flag_precedence() -> None:
    env = {"STOWAWAY_PORT": "1104", "STOWAWAY_DATA_DIR": "/var/lib/x", "STOWAWAY_AET": "ENVAET"}
    s = settings_for(["receive", "--aet", "FLAGAET"], env)
    assert s.port == 1104
    assert s.aet == "FLAGAET"
    assert s.db_url == "sqlite:////var/lib/x/queue.db"


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["receive", "--port", "70000"], {}, "--port"),
        (["receive", "--port", "abc"], {}, "--port"),
        (["receive"], {"STOWAWAY_PORT": "-1"}, "STOWAWAY_PORT"),
        (["receive", "--aet", "THIS_TITLE_IS_FAR_TOO_LONG"], {}, "--aet"),
        (["serve", "--dicomweb-url", "ftp://x"], {}, "--dicomweb-url"),
        (["serve", "--backoff-initial", "1h", "--backoff-max", "1m"], {}, "--backoff-initial"),
        (["receive", "--db-url", "mysql://x/y"], {}, "--db-url"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        settings_for(argv, env)


def test_durations_and_sizes() -> None:
    s = settings_for(
        [
            "serve",
            "--backoff-initial",
            "500ms",
            "--backoff-max",
            "10m",
            "--min-free-disk",
            "64MiB",
            "--max-attempts",
            "5",
        ]
    )
    assert s.backoff_initial == 0.5
    assert s.backoff_max == 600
    assert s.min_free_disk == 64 * 1024 * 1024
    assert s.max_attempts == 5


def test_cli_misuse_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stowaway.cli", "receive", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "stowaway: error: --port: a port is 0 to 65535 (got '99999')"
    ]


def test_query_settings_default_to_the_forwarding_destination() -> None:
    s = settings_for(["serve", "--dicomweb-url", "http://store/dicom-web"])
    assert s.query_source == "http://store/dicom-web"
    s = settings_for(
        ["serve", "--dicomweb-url", "http://a/dw", "--query-url", "http://b/dw", "--fuzzy_matching"]
    )
    assert (s.query_source, s.fuzzy_matching) == ("http://b/dw", True)
    assert settings_for(["receive"]).query_source is None
    off = settings_for(["serve", "--dicomweb-url", "http://a/dw", "--query-url", "off"])
    assert off.query_source is None


def test_aet_dictionary_sources_follow_googles_precedence(tmp_path: Path) -> None:
    path = tmp_path / "aets.json"
    path.write_text("[{'name': 'FROMFILE', 'host': 'h', 'port': 104}]")
    env = {"ENV_AETS_JSON": '[{"name": "FROMENV", "host": "h", "port": 104}]'}
    inline = '[{"name": "INLINE", "host": "h", "port": 104}]'
    argv = ["receive", "--aet_dictionary", str(path)]
    assert set(settings_for([*argv, "--aet_dictionary_inline", inline], env).move_destinations) == {
        "INLINE"
    }
    assert set(settings_for(argv, env).move_destinations) == {"FROMFILE"}
    assert set(settings_for(["receive"], env).move_destinations) == {"FROMENV"}
    s = settings_for(["receive", "--dimse_cmove_aet", "MOVER"])
    assert s.cmove_aet == "MOVER"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--query-page-size", "5001"], "--query-page-size: at most 5000"),
        (["--query-max-results", "70000"], "--query-max-results: at most 65535"),
        (["--aet-dictionary-inline", "[{'name': 'X'}]"], "--aet_dictionary_inline: entry 1"),
    ],
)
def test_bad_query_settings_stop_start_up_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_for(["receive", *argv])
