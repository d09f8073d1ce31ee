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
