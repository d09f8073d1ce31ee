"""--max-instance-size: a size with a generous default, refused at start-up when unusable."""

from __future__ import annotations

import pytest

from stowaway.cli import build_parser
from stowaway.settings import SettingsError, load_settings


def test_max_instance_size_defaults_to_4_gib_and_takes_sizes() -> None:
    parser = build_parser()
    assert load_settings(parser.parse_args(["receive"]), {}).max_instance_size == 4 * 1024**3
    args = parser.parse_args(["receive", "--max-instance-size", "512MiB"])
    assert load_settings(args, {}).max_instance_size == 512 * 1024**2
    env = {"STOWAWAY_MAX_INSTANCE_SIZE": "2GiB"}
    assert load_settings(parser.parse_args(["serve"]), env).max_instance_size == 2 * 1024**3


def test_a_zero_max_instance_size_is_refused_naming_the_flag() -> None:
    args = build_parser().parse_args(["receive", "--max-instance-size", "0"])
    with pytest.raises(SettingsError, match=r"^--max-instance-size: must be at least 1 byte$"):
        load_settings(args, {})
